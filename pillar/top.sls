# Example pillar top file for salt-release: who gets which part of the config.
base:
  # Every node of the app: layout, the files each node renders, the secrets.
  'G@role:web':
    - match: compound
    - rainbow
    - rainbow_secrets
  # An environment default: every test node talks to the test database.
  'G@env:test':
    - match: compound
    - rainbow_env_test
  # A per-node override: web2 uses its own database replica.
  'web2':
    - rainbow_web2
  # A file only one node of the cluster gets: the scheduler runs on web1 alone.
  'web1':
    - rainbow_cron
