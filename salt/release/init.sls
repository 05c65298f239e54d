{#- Keep every project this node has settings for (pillar release:<project>) on its
    environment's release, which the release_fleet ext_pillar names after a good deploy.
    A project nobody has deployed yet is a no-op. #}
{%- for project in salt['pillar.get']('release', {}) | sort %}
release-{{ project }}:
  release.deployed:
    - name: {{ project }}
{%- endfor %}
