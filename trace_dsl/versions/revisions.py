"""Policy references of the form `path`, `path@REV`, and how to read them from git.

A plain path is the file in the working tree. `path@REV` is the file as committed at `REV` (a
branch, tag, commit or expression such as `HEAD~1`) in the git repository that contains the path.
Imports must stay inside the policy's folder tree. That folder is therefore extracted at the same
revision into a temporary directory, and the policy is loaded from there, so an import reads the
imported file as it was at `REV`, not as it is in the working tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trace_dsl.errors import GitRevisionError, TraceError

# Files extracted with the policy: the language only imports other `.tp` files.
POLICY_SUFFIX = ".tp"


@dataclass(frozen=True, slots=True)
class PolicyRef:
    """A policy file, optionally at a git revision.

    Attributes:
        path: the file as written by the user (relative to the current directory or absolute).
        revision: the git revision, or `None` for the working tree.
    """

    path: Path
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "PolicyRef":
        """Split `path@REV` into path and revision.

        An existing file whose name contains `@` is taken as a plain path. Otherwise the text is
        split at its last `@`; an empty revision (`policy.tp@`) is an error.
        """
        if "@" not in text or Path(text).exists():
            return cls(Path(text))
        path, revision = text.rsplit("@", 1)
        if not path or not revision:
            raise GitRevisionError(
                f"invalid policy reference {text!r}: expected PATH or PATH@REVISION",
                hint="write for example policies/main.tp@HEAD~1 or policies/main.tp@v1.2",
            )
        return cls(Path(path), revision)

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else str(self.path)


def _run_git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise GitRevisionError(
            "git is not installed or not on PATH", hint="install git to read policies at a revision"
        ) from None


def _git_message(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode("utf-8", "replace").strip() or f"git exited with status {result.returncode}"


def _existing_folder(path: Path) -> Path:
    """Return the nearest existing folder at or above the file's folder.

    The file itself may have been deleted or renamed since the revision it is read at.
    """
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


@dataclass(frozen=True, slots=True)
class GitLocation:
    """The location of a referenced file in its repository.

    Attributes:
        root: the repository's top-level folder.
        relpath: the file's path relative to `root`, with `/` separators, as git names it.
        commit: the full commit id the revision resolves to.
    """

    root: Path
    relpath: str
    commit: str


def locate(ref: PolicyRef) -> GitLocation:
    """Resolve a `path@REV` reference to its repository, path in the repository, and commit.

    Raises:
        GitRevisionError: the path is not in a git repository, the revision does not exist, or
            the file does not exist at that revision. The message quotes git's own output.
    """
    if ref.revision is None:
        raise ValueError("locate() needs a reference with a revision")
    absolute = Path(os.path.abspath(ref.path))
    folder = _existing_folder(absolute)

    top = _run_git(["rev-parse", "--show-toplevel"], folder)
    if top.returncode != 0:
        raise GitRevisionError(
            f"cannot read {ref}: {folder} is not in a git repository ({_git_message(top)})",
            hint=f"drop '@{ref.revision}' to read the file from disk, or run `git init` and commit it",
        )
    root = Path(top.stdout.decode().strip())
    # realpath on both sides: a symlinked temp or home folder would otherwise give a relative
    # path that starts with '..'.
    relpath = Path(os.path.realpath(folder)).relative_to(os.path.realpath(root)) / absolute.relative_to(folder)
    relpath_text = relpath.as_posix()

    commit = _run_git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref.revision}^{{commit}}"], root)
    if commit.returncode != 0:
        # `--quiet` suppresses the message, so ask once more for git's own words.
        detail = _run_git(["rev-parse", "--verify", "--end-of-options", f"{ref.revision}^{{commit}}"], root)
        raise GitRevisionError(
            f"cannot read {ref}: revision {ref.revision!r} not found in {root} ({_git_message(detail)})",
            hint="list revisions with `git log --oneline` or `git tag`; a shallow clone may lack old commits",
        )
    commit_id = commit.stdout.decode().strip()

    exists = _run_git(["cat-file", "-e", f"{commit_id}:{relpath_text}"], root)
    if exists.returncode != 0:
        detail = _run_git(["show", f"{ref.revision}:{relpath_text}"], root)
        raise GitRevisionError(
            f"cannot read {ref}: {relpath_text} does not exist at {ref.revision} ({_git_message(detail)})",
            hint=f"see where the file was with `git log --oneline --follow -- {relpath_text}`",
        )
    return GitLocation(root=root, relpath=relpath_text, commit=commit_id)


def read_source(ref: PolicyRef) -> str:
    """Return the text of the referenced file: from disk, or from git at the revision.

    Raises:
        GitRevisionError: for a revision that cannot be read (see `locate`).
        TraceError: for a working-tree file that does not exist.
    """
    if ref.revision is None:
        try:
            return ref.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TraceError(f"policy file not found: {ref.path}", hint="check the path, or add @REVISION") from None
    location = locate(ref)
    blob = _run_git(["show", f"{location.commit}:{location.relpath}"], location.root)
    if blob.returncode != 0:
        raise GitRevisionError(f"cannot read {ref}: {_git_message(blob)}")
    return blob.stdout.decode("utf-8")


def _list_policy_files(location: GitLocation) -> list[str]:
    folder = location.relpath.rsplit("/", 1)[0] if "/" in location.relpath else ""
    args = ["ls-tree", "-r", "-z", "--name-only", location.commit]
    if folder:
        args += ["--", f"{folder}/"]
    listed = _run_git(args, location.root)
    if listed.returncode != 0:
        raise GitRevisionError(f"cannot list files at {location.commit[:12]}: {_git_message(listed)}")
    names = [n for n in listed.stdout.decode("utf-8").split("\0") if n]
    return [n for n in names if n.endswith(POLICY_SUFFIX) or n == location.relpath]


def _read_blobs(location: GitLocation, relpaths: list[str]) -> dict[str, bytes]:
    """Read many files at one commit with a single `git cat-file --batch` process."""
    request = "".join(f"{location.commit}:{p}\n" for p in relpaths).encode("utf-8")
    try:
        result = subprocess.run(
            ["git", "cat-file", "--batch"], cwd=location.root, input=request, capture_output=True, check=False
        )
    except FileNotFoundError:
        raise GitRevisionError("git is not installed or not on PATH") from None
    if result.returncode != 0:
        raise GitRevisionError(f"git cat-file failed at {location.commit[:12]}: {_git_message(result)}")
    out = result.stdout
    blobs: dict[str, bytes] = {}
    position = 0
    for relpath in relpaths:
        end = out.index(b"\n", position)
        header = out[position:end].decode("utf-8", "replace")
        position = end + 1
        if header.endswith(" missing"):
            continue
        size = int(header.rsplit(" ", 1)[1])
        blobs[relpath] = out[position : position + size]
        position += size + 1  # the content is followed by a newline
    return blobs


@contextmanager
def checkout_policy_tree(ref: PolicyRef) -> Iterator[Path]:
    """Yield a path to the referenced policy file, with its folder's `.tp` files beside it.

    For the working tree this is the file itself. For `path@REV` every `.tp` file under the
    policy's folder at `REV` is written into a temporary directory, kept until the block exits, so
    imports resolve at the same revision.
    """
    if ref.revision is None:
        if not ref.path.is_file():
            raise TraceError(f"policy file not found: {ref.path}", hint="check the path, or add @REVISION")
        yield ref.path
        return

    location = locate(ref)
    blobs = _read_blobs(location, _list_policy_files(location))
    scratch = Path(tempfile.mkdtemp(prefix="trace-policy-rev-"))
    try:
        for relpath, content in blobs.items():
            target = scratch.joinpath(*relpath.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        yield scratch.joinpath(*location.relpath.split("/"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def rewrite_paths(text: str, scratch_file: Path, ref: PolicyRef) -> str:
    """Replace the temporary checkout path in a message with the user's `path@REV` form."""
    scratch_root = str(scratch_file).split("trace-policy-rev-", 1)
    if len(scratch_root) != 2:
        return text
    prefix = re.escape(scratch_root[0] + "trace-policy-rev-") + r"[^/\\]+[/\\]"
    return re.sub(prefix + r"([^\s:]+)", lambda m: f"{m.group(1)}@{ref.revision}", text)
