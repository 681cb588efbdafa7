"""Atomic result writing with provenance sidecars (config, seed, package versions, git commit).

    from cfmoe.provenance import save_table
    save_table(df, "results/00_base_model/perplexity", config=cfg)   # .csv + .md + .json
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

_PACKAGES = ("cfmoe", "torch", "transformers", "tokenizers", "datasets", "peft", "numpy", "pandas", "numba")


TMP_SUFFIX = ".tmp"  # temporary files and folders end with it (git-ignored; swept by `staged_folder`)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place, with ordinary permissions, only if the
    block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling of `folder` to fill; when the block succeeds it replaces `folder` whole (the old one
    moved aside first and removed last), else it is dropped: `folder` is never half-written."""
    folder = Path(folder)
    partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds, move every file written there into `folder`
    (replacing files of the same name), else drop it: a failed or killed writer leaves `folder` as it was.

    Leftovers of an earlier killed writer (staging folders, temporary files) are removed first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.parent.glob(f".{folder.name}.*{TMP_SUFFIX}"), *folder.glob(f".*{TMP_SUFFIX}")]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TMP_SUFFIX, dir=folder.parent))
    try:
        yield staging
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = folder / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (Path, set, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    return str(value)


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The current commit (with '-dirty' when the tree has changes), or 'unknown' outside git.

    CFMOE_COMMIT overrides it, for machines that receive the work tree without .git (the GPU machine).
    """
    if os.environ.get("CFMOE_COMMIT"):
        return os.environ["CFMOE_COMMIT"]
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def sidecar(config: Any = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance record written next to every figure and table."""
    record = {
        "config": config,
        "seed": seed if seed is not None else getattr(config, "seed", None),
        "versions": package_versions(),
        "commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    record.update(extra)
    return record


def _created() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_table(df, stem: str | os.PathLike, config: Any = None, seed: int | None = None, **extra: Any) -> Path:
    """Write `stem`.csv, `stem`.md and `stem`.json (provenance) atomically; returns the CSV path."""
    stem = Path(stem)
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_text_atomic(stem.with_suffix(".md"), df.to_markdown(index=False, floatfmt=".4g") + "\n")
    write_json_atomic(stem.with_suffix(".json"), sidecar(config, seed, artifact=stem.name + ".csv", **extra))
    return stem.with_suffix(".csv")


def save_figure(fig, stem: str | os.PathLike, config: Any = None, seed: int | None = None, **extra: Any) -> Path:
    """Write `stem`.png and `stem`.svg plus a `stem`.json provenance sidecar; returns the PNG path."""
    stem = Path(stem)
    for suffix in (".png", ".svg"):
        with atomic_path(stem.with_suffix(suffix)) as tmp:
            # svg hashes change with matplotlib's random ids unless fixed
            fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight",
                        metadata={"Date": None} if suffix == ".svg" else {"Software": None})
    write_json_atomic(stem.with_suffix(".json"), sidecar(config, seed, artifact=stem.name + ".png", **extra))
    return stem.with_suffix(".png")
