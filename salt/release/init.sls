{#- Keep every project this node has settings for on its environment's release.
    The release comes from the release_fleet ext_pillar (recorded by the runner after a
    good deploy); the node's settings (deploy_to, user, shared) from pillar release:<project>. #}
{%- for project in salt['pillar.get']('release', {}) | sort %}
{%-   if project in salt['pillar.get']('release_fleet', {}) %}
release-{{ project }}:
  release.deployed:
    - name: {{ project }}
{%-   endif %}
{%- endfor %}
