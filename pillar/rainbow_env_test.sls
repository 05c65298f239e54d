release:
  rainbow:
    db_host: db.test.internal
