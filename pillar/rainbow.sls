# What salt-release needs on each node of rainbow, and the files it renders
# into every release (so a rollback brings the matching config back).
release:
  rainbow:
    deploy_to: /srv/rainbow
    user: www-data                 # the app user: reads code, writes only shared/
    shared: [storage, logs]
    keep_releases: 5
    db_host: 10.0.0.10             # overridden per environment or node
    files:
      # A template shipped in the repo, rendered with Jinja: 0640 root:www-data.
      config/db.php: {template: config/db.php.example}
      # A template kept outside the repo, on the master: owned by the app user, 0600.
      config/pay.php: {source: salt://rainbow/pay.php.j2, owner: app}
