release:
  rainbow:
    db_host: db-replica-2.internal
