"""Git credentials of a private data repository for the pipeline's data steps: the optional git-credentials Secret
(``settings.DATA_REPO_SECRETS``) gives the pods ``GIT_TOKEN`` / ``GIT_USERNAME``; :func:`data_repo_git` hands them
to git and to DVC's in-process git without putting them on a command line, in a URL, a file or a log, and only
for the data repository's https host."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from customcrafter.utils import scoped_environ

__all__ = ["GIT_HOST_ENV", "GIT_TOKEN_ENV", "GIT_USERNAME_ENV", "data_repo_git", "git_env", "token_host"]

logger = logging.getLogger(__name__)

# The git credentials of a private data repository: env vars of the optional git-credentials Secret
# (settings.DATA_REPO_SECRETS). Without GIT_USERNAME the user is x-access-token (GitHub; GitLab takes any name).
GIT_TOKEN_ENV, GIT_USERNAME_ENV = "GIT_TOKEN", "GIT_USERNAME"
# The one host (host[:port], lower case) the askpass answers for: set by data_repo_git, read by the script as data.
GIT_HOST_ENV = "CUSTOMCRAFTER_GIT_HOST"
# git (and scmrepo) call the askpass with "Username for 'https://[user@]host[:port][/path]': " or "Password for
# '...': ". The script takes the URL between the first and the last quote and answers only for an https URL whose
# host[:port] (after the last @ before the first /, in lower case) is $CUSTOMCRAFTER_GIT_HOST; otherwise, and for an
# @ after the first / (a user name holding a /, "https://a@github.com/@evil.com", reads as another host), it prints
# an empty line (scmrepo reads the first line of the answer: there must be one). The prompt and the host are only
# expanded inside double quotes or as the subject of a case: no eval, no pattern made of them.
_ASKPASS_SCRIPT = f"""#!/bin/sh
# git askpass of customcrafter: answers git's prompts from the environment when git calls it, for the https host
# in ${GIT_HOST_ENV} only; holds no credential
none() {{ printf '\\n'; exit 0; }}
url=${{1#*\\'}}
url=${{url%\\'*}}
case "$url" in https://*) ;; *) none ;; esac
rest=${{url#https://}}
case "$rest" in */*@*) none ;; esac
authority=${{rest%%/*}}
host=$(printf '%s' "${{authority##*@}}" | tr '[:upper:]' '[:lower:]')
if [ -z "${{{GIT_HOST_ENV}:-}}" ] || [ "x$host" != "x${GIT_HOST_ENV}" ]; then none; fi
case "$1" in
  "Username for "*) printf '%s\\n' "${{{GIT_USERNAME_ENV}:-x-access-token}}" ;;
  "Password for "*) printf '%s\\n' "${{{GIT_TOKEN_ENV}:-}}" ;;
  *) none ;;
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


def token_host(data_source: str) -> str | None:
    """The host the token may go to: ``host[:port]`` of an https ``data_source`` as git names it in its prompts
    (lower case, without the user part), or None for any other URL (``git@host:repo`` and ``ssh://``: no key is
    provided; ``http://``: no token in clear text; a local path)."""
    parts = urlsplit(data_source.strip())
    if parts.scheme.lower() != "https":
        return None
    host = parts.netloc.rpartition("@")[2].lower()
    return host or None


def git_env(data_source: str) -> dict[str, str]:
    """The environment variables :func:`data_repo_git` sets for ``data_source``: never a terminal prompt, the host
    the askpass answers for (empty: none), and with ``GIT_TOKEN`` set and an https source the askpass that answers
    from it."""
    host = token_host(data_source)
    env = {"GIT_TERMINAL_PROMPT": "0", GIT_HOST_ENV: host or ""}
    if os.environ.get(GIT_TOKEN_ENV):
        if host is None:
            logger.warning("%s is set but the data source is not an https URL: the token is not used (git "
                           "over SSH gets no key from the pipeline)", GIT_TOKEN_ENV)
        else:
            env["GIT_ASKPASS"] = str(_askpass())
    return env


@contextlib.contextmanager
def data_repo_git(data_source: str):
    """Around DVC's clone/fetch of a git ``data_source``: git (and DVC's in-process git, scmrepo) gets the
    credentials of a private repository from ``GIT_TOKEN`` / ``GIT_USERNAME`` (the optional git-credentials
    Secret) and never prompts (``GIT_TERMINAL_PROMPT=0``: a pod has no terminal; a missing credential fails).

    The route is ``GIT_ASKPASS``, a script (:func:`_askpass`) that prints ``$GIT_USERNAME`` (default
    x-access-token) or ``$GIT_TOKEN`` when git asks: the token is read from the environment at call time, so it is
    on no command line, in no URL, config value, file or log. Git and scmrepo (DVC clones with dulwich/pygit2 in
    this process) both ask GIT_ASKPASS after the configured credential helpers; a helper set with
    ``GIT_CONFIG_COUNT`` would reach the git program only, as dulwich does not read those variables.

    The token goes to ``data_source``'s host only (:func:`token_host`, passed to the script in
    ``CUSTOMCRAFTER_GIT_HOST``): a prompt for any other host (a redirect, a submodule, a DVC import from another
    repository) or a non-https URL gets an empty answer, and so does any prompt outside this block (scmrepo keeps
    calling the askpass it saw first). The variables are set in ``os.environ`` (DVC runs here, not in a
    subprocess) and restored afterwards."""
    with scoped_environ(git_env(data_source)):
        yield
