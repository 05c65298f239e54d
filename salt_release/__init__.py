"""
salt-release as a pip package: the ``salt.loader`` entry point names this
package, so Salt finds the execution, state and runner modules in its
``modules``, ``states`` and ``runners`` sub-packages (setup.py maps the
repository's ``_modules``, ``_states``, ``_runners`` and ``_utils`` onto them).
"""
