"""Git credentials of a private data repository for the pipeline's data steps: the optional git-credentials Secret
(``settings.DATA_REPO_SECRETS``) gives the pods ``GIT_TOKEN`` / ``GIT_USERNAME``; :func:`data_repo_git` hands them
to git and to DVC's in-process git without putting them on a command line, in a URL, a file or a log."""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from pathlib import Path

from customcrafter.utils import scoped_environ

__all__ = ["GIT_TOKEN_ENV", "GIT_USERNAME_ENV", "data_repo_git", "git_env"]

# The git credentials of a private data repository: env vars of the optional git-credentials Secret
# (settings.DATA_REPO_SECRETS). Without GIT_USERNAME the user is x-access-token (GitHub; GitLab takes any name).
GIT_TOKEN_ENV, GIT_USERNAME_ENV = "GIT_TOKEN", "GIT_USERNAME"
_ASKPASS_SCRIPT = f"""#!/bin/sh
# git askpass of customcrafter: answers git's prompts from the environment when git calls it; holds no credential
case "$1" in
  Username*) printf '%s\\n' "${{{GIT_USERNAME_ENV}:-x-access-token}}" ;;
  *) printf '%s\\n' "${GIT_TOKEN_ENV}" ;;
esac
"""
_askpass_path: Path | None = None


def _askpass() -> Path:
    """The askpass script of this process: a private (0700) temporary file, removed at exit. One per process, as
    scmrepo remembers the first GIT_ASKPASS it sees: one removed meanwhile (a temporary-file cleaner) is written
    again at the same path."""
    global _askpass_path
    if _askpass_path is not None and _askpass_path.is_file():
        return _askpass_path
    if _askpass_path is not None:
        try:  # exclusively: a file someone else put there meanwhile is not ours to run
            fd = os.open(_askpass_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        except FileExistsError:
            pass
        else:
            _write_script(fd, _askpass_path)
            return _askpass_path
    fd, name = tempfile.mkstemp(prefix="customcrafter-askpass-", suffix=".sh")  # mode 0600, owner only
    _askpass_path = Path(name)
    _write_script(fd, _askpass_path)
    atexit.register(_askpass_path.unlink, missing_ok=True)
    return _askpass_path


def _write_script(fd: int, path: Path) -> None:
    with os.fdopen(fd, "w") as file:
        file.write(_ASKPASS_SCRIPT)
    os.chmod(path, 0o700)


def git_env() -> dict[str, str]:
    """The environment variables :func:`data_repo_git` sets: never a terminal prompt, and with ``GIT_TOKEN`` set
    the askpass that answers from it."""
    env = {"GIT_TERMINAL_PROMPT": "0"}
    if os.environ.get(GIT_TOKEN_ENV):
        env["GIT_ASKPASS"] = str(_askpass())
    return env


@contextlib.contextmanager
def data_repo_git():
    """Around DVC's clone/fetch of a git ``data_source``: git (and DVC's in-process git, scmrepo) gets the
    credentials of a private repository from ``GIT_TOKEN`` / ``GIT_USERNAME`` (the optional git-credentials
    Secret) and never prompts (``GIT_TERMINAL_PROMPT=0``: a pod has no terminal; a missing credential fails).

    The route is ``GIT_ASKPASS``, a script (:func:`_askpass`) that prints ``$GIT_USERNAME`` (default
    x-access-token) or ``$GIT_TOKEN`` when git asks: the token is read from the environment at call time, so it is
    on no command line, in no URL, config value, file or log. Git and scmrepo (DVC clones with dulwich/pygit2 in
    this process) both ask GIT_ASKPASS after the configured credential helpers; a helper set with
    ``GIT_CONFIG_COUNT`` would reach the git program only, as dulwich does not read those variables. The token goes
    to whatever host git asks for credentials while cloning ``data_source`` (a 401 of that server), no other.
    The variables are set in ``os.environ`` (DVC runs here, not in a subprocess) and restored afterwards."""
    with scoped_environ(git_env()):
        yield
