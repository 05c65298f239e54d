{#- salt-api fired salt/netapi/hook/release/<project>: hand the request to the runner.
    Runner arguments land in the job cache and on the bus (salt/run/<jid>/new), so only the
    headers the runner needs are passed, and a GitLab secret token only as its sha256. -#}
{%- set wanted = ['x-hub-signature-256', 'x-github-event', 'x-github-delivery',
                  'x-gitlab-event', 'x-gitlab-event-uuid', 'idempotency-key',
                  'webhook-id', 'webhook-timestamp', 'webhook-signature', 'content-type',
                  'content-length'] %}
{%- set headers = {} %}
{%- set token = [] %}
{%- for key, value in data.get('headers', {}).items() %}
{%-   if key | lower in wanted %}{% do headers.update({key: value}) %}{% endif %}
{%-   if key | lower == 'x-gitlab-token' %}{% do token.append(value | sha256) %}{% endif %}
{%- endfor %}
release_webhook:
  runner.release.webhook:
    - args:
      - project: {{ tag.split('/', 4)[4] | tojson }}
      - body: {{ data.get('body', '') | tojson }}
      - headers: {{ headers | tojson }}
      - gitlab_token_sha256: {{ (token | first if token else '') | tojson }}
