{#- Keep every project this node has settings for (pillar release:<project>) on its
    environment's release, which the release_fleet ext_pillar names after a good deploy
    (release.deployed: install, configure, switch, reload, health check), then trim its
    releases folder (release.pruned: keep_releases, never current or the rollback target).
    A project nobody has deployed to this node's environment yet is a no-op. #}
{%- for project in salt['pillar.get']('release', {}) | sort %}
release-{{ project }}:
  release.deployed:
    - name: {{ project }}

release-{{ project }}-pruned:
  release.pruned:
    - name: {{ project }}
    - require:
      - release: release-{{ project }}
{%- endfor %}
