"""The run directory that `trace apply` writes and `trace eval` reads.

Layout (every path is relative to the run directory):

    manifest.json          policy hash, dataset hash, resolved model, effective configuration,
                           package versions, seed, command line, start and end times, status
    triage.jsonl           one verdict per pair
    split.json             the seeded held-out split: pair ids for training and for `trace eval`
    impact_scores.jsonl    one impact score per conflict pair, with its reference log-probabilities
    adapter/               the LoRA adapter (safetensors) and the tokenizer
    merged/                the adapter merged into the base model (only with `--merge`)
    checkpoints/           Trainer checkpoints, for `--resume`
    metrics.jsonl          one row of loss terms per optimiser step
    report.md, plots/      the training report and its PNG plots
    eval.json              written by `trace eval`
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _metadata
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from trace_dsl.errors import RunDirectoryError

MANIFEST_SCHEMA_VERSION = 1

# Distributions whose versions decide what a run computes; recorded in every manifest.
_RECORDED_PACKAGES = ("trace-dsl", "torch", "transformers", "peft", "trl", "accelerate", "datasets")

# Files `--overwrite` removes. The triage and impact scores stay until they are rewritten, so a
# rerun with unchanged inputs can reuse the impact scores.
_OUTPUTS_REMOVED_ON_OVERWRITE = ("adapter", "merged", "checkpoints", "metrics.jsonl", "report.md", "plots", "eval.json")


def utc_now() -> str:
    """Return the current time as an ISO 8601 string in UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what a run computes, plus Python's."""
    versions = {"python": sys.version.split()[0]}
    for name in _RECORDED_PACKAGES:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSON lines through a temporary file, so a crash never leaves half a file.

    Returns the number of rows written.
    """
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it, so a killed run keeps every row written so far."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the rows of a JSON-lines file; a malformed line raises `RunDirectoryError` naming it."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunDirectoryError(
                    f"{path}:{number}: invalid JSON line ({exc.msg})",
                    hint="the run directory is damaged; rerun `trace apply` with --overwrite",
                ) from None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a JSON document through a temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON document; a missing or malformed file raises `RunDirectoryError`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} not found", hint="is this a run directory written by `trace apply`?") from None
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


@dataclass(frozen=True)
class RunDirectory:
    """Paths of one run directory. The module docstring lists what each contains."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def triage(self) -> Path:
        return self.root / "triage.jsonl"

    @property
    def triage_cache(self) -> Path:
        return self.root / "triage_cache.sqlite"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def impact_scores(self) -> Path:
        return self.root / "impact_scores.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    # -- lifecycle ---------------------------------------------------------------------------

    def prepare(self, *, overwrite: bool = False, resume: bool = False) -> None:
        """Create the directory for a new run, clear it for `overwrite`, or check it for `resume`.

        Raises:
            RunDirectoryError: the directory contains a run and neither flag is set, or `resume`
                is set and there is no run to resume.
        """
        if overwrite and resume:
            raise RunDirectoryError("--overwrite and --resume cannot be combined", hint="pick one")
        exists = self.root.exists() and any(self.root.iterdir())
        if resume:
            if not self.manifest.exists():
                raise RunDirectoryError(
                    f"{self.root} contains no run to resume (manifest.json not found)",
                    hint="start the run without --resume",
                )
            return
        if exists and not overwrite:
            raise RunDirectoryError(
                f"run directory {self.root} already exists and is not empty",
                hint="pass --overwrite to replace it, --resume to continue it, or choose another -o",
            )
        if exists and not self.manifest.exists():
            # --overwrite replaces a run, but a folder of other files (`-o .` by mistake) is rejected
            # because the run's outputs would be mixed into it.
            raise RunDirectoryError(
                f"{self.root} is not empty and contains no run (no manifest.json), so --overwrite does not replace it",
                hint="choose an empty or new directory for -o",
            )
        if self.root.exists() and not self.root.is_dir():
            raise RunDirectoryError(f"{self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        for name in _OUTPUTS_REMOVED_ON_OVERWRITE:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def read_manifest(self) -> dict[str, Any]:
        """Read the manifest. Raises `RunDirectoryError` when the directory contains no run."""
        return read_json(self.manifest)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the manifest (created if missing) and write it back."""
        manifest = read_json(self.manifest) if self.manifest.exists() else {"schema_version": MANIFEST_SCHEMA_VERSION}
        manifest.update(fields)
        write_json(self.manifest, manifest)
        return manifest

    def last_checkpoint(self) -> Path | None:
        """Return the complete checkpoint folder with the highest step, or None when there is none.

        transformers' Trainer writes `trainer_state.json` last, so a folder without it is a save
        cut short by an interruption, and resuming from it would fail.
        """
        if not self.checkpoints.is_dir():
            return None
        found = []
        for child in self.checkpoints.iterdir():
            prefix, _, step = child.name.partition("-")
            complete = (child / "trainer_state.json").is_file()
            if child.is_dir() and prefix == "checkpoint" and step.isdigit() and complete:
                found.append((int(step), child))
        return max(found)[1] if found else None
