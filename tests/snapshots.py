"""What "the same release" means when two installs are compared."""

import os


def snapshot(root):
    """Each path below ``root``: its mode and owner, a file's bytes, a link's target."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if os.path.islink(path):
                body = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    body = handle.read()
            else:
                body = None
            found[os.path.relpath(path, root)] = (info.st_mode, info.st_uid, body)
    return found
