"""Local paths and cloud URLs (`gs://...`, and any scheme etils.epath serves) behind one small API.

What goes where when `--output_dir` is a URL:
- Checkpoints go straight to the URL through orbax: every process writes its own shards there
  (tensorstore), so a pod's checkpoint is one checkpoint, restorable on another mesh.
- The run's small files (metrics.jsonl, TensorBoard events, easytune_config.json, the tokenizer,
  summary.json, wandb_run_id) are written to a local mirror of the run directory
  (`mirror(url)`) and uploaded by process 0 at every checkpoint save and at the end
  (`sync_run_files`); `--resume` downloads them first (`fetch_run_files`). Object stores have no
  append, no exclusive create and no rename, and tensorboardX writes local files: hence the mirror.
- Exports (`--export_hf`, `--export_peft`, `export_hf --output_dir`) are written locally, then
  uploaded (`writable_dir`). Models and data files read from a URL are downloaded to the mirror
  first (`local_copy`), since transformers, tokenizers and our readers open local files.

Why hand-written and this small: etils.epath (already required by orbax) does the I/O for every
scheme; what no library does is the local-mirror policy above. `gs://` needs `gcsfs` (the `gcs`
extra). Against an emulator (tests), set `STORAGE_EMULATOR_HOST` (gcsfs) and
`TENSORSTORE_GCS_HTTP_URL` (orbax's tensorstore) to its address, and
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (gcsfs otherwise probes the bucket type over gRPC,
which an emulator does not serve, for a minute).
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid

RUN_FILE_DIRS = ("tensorboard",)   # folders of the run mirror synced with its top-level files


def is_remote(path) -> bool:
    """Whether `path` is a URL of a remote store (`gs://b/x`), not a local path (`file://` is local)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _epath(path: str):
    """An etils.epath path, with the filesystem's listing cache dropped first: other processes
    (a run's other hosts, orbax deleting old steps) change the store between our calls."""
    from etils import epath
    result = epath.Path(path)
    try:
        result._backend.fs(path).invalidate_cache()  # the fsspec filesystem epath holds for this scheme
    except Exception:  # a backend without fsspec's listing cache (tf.io.gfile)
        pass
    return result


def absolute(path: str) -> str:
    """An absolute local path, or the URL unchanged (orbax wants absolute paths; `os.path.abspath`
    would turn `gs://b/r` into `./gs:/b/r`)."""
    return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return os.path.join(path, *parts)  # '/'-joined: right for URLs too


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return [child.name for child in _epath(path).iterdir()]
    return os.listdir(path)


def read_text(path: str) -> str:
    if is_remote(path):
        return _epath(path).read_text()
    with open(path) as f:
        return f.read()


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("EASYTUNE_CACHE", "~/.cache/easytune"))


def mirror(url: str) -> str:
    """The local directory that stands for `url` on this host (a path is its own mirror)."""
    if not is_remote(url):
        return url
    scheme, rest = url.split("://", 1)
    rest = rest.strip("/")
    digest = hashlib.sha1(url.encode()).hexdigest()[:10]  # one mirror per URL, nested in no other's
    return os.path.join(cache_root(), "remote", digest, scheme,
                        *[p for p in rest.split("/") if p not in ("", ".", "..")])


def run_files(output_dir: str) -> str:
    """Where a run writes its small files: `output_dir` itself, or its local mirror for a URL."""
    return mirror(output_dir)


def download(url: str, local: str) -> None:
    """Copy the file or directory tree at `url` to the local path `local`."""
    _download(_epath(url), local)


def _download(source, local: str) -> None:
    """`download` of an epath object: a tree's children come from one listing each (their
    file/folder kind from it too), not from a fresh listing per file."""
    if source.is_dir():
        os.makedirs(local, exist_ok=True)
        for child in source.iterdir():
            _download(child, os.path.join(local, child.name))
        return
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = f"{local}.{uuid.uuid4().hex[:8]}.tmp"
    with source.open("rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, local)


def upload(local: str, url: str, recursive: bool = True) -> None:
    """Copy the local file or directory `local` to `url` (each object's write is atomic in GCS)."""
    if os.path.isdir(local):
        for name in sorted(os.listdir(local)):
            child = os.path.join(local, name)
            if os.path.isfile(child) or (recursive and os.path.isdir(child)):
                upload(child, join(url, name), recursive)
        return
    target = _epath(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def local_copy(url: str) -> str:
    """A local path holding what `url` holds; a local path as it is. Each call downloads into a
    folder of its own (removed when the process exits): processes of one host never write into or
    delete each other's copy."""
    if not is_remote(url):
        return url
    if not exists(url):
        raise FileNotFoundError(f"{url} does not exist.")
    local = os.path.join(_download_folder(), url.rstrip("/").rsplit("/", 1)[-1])  # the name (and extension) kept
    download(url, local)
    return local


def _download_folder() -> str:
    """A new folder under the cache for one call's downloads, removed when the process exits."""
    root = os.path.join(cache_root(), "downloads")
    os.makedirs(root, exist_ok=True)
    folder = tempfile.mkdtemp(dir=root)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def local_files(url: str, names=None) -> str:
    """A local directory holding the top-level files of the directory `url` (a tokenizer and
    configs beside a checkpoint's folders, which stay where they are; `names(name) -> bool` picks
    which), in a folder of this call's own; a local path as it is."""
    if not is_remote(url):
        return url
    local = _download_folder()
    for child in _epath(url).iterdir():
        if child.is_file() and (names is None or names(child.name)):
            _download(child, os.path.join(local, child.name))
    return local


def check_writable(url: str) -> None:
    """Write and delete a probe object under `url`: an unreachable store, missing credentials or a
    bucket without write permission is one sentence here, before anything compiles."""
    if not is_remote(url):
        return
    probe = join(url, f".easytune-probe-{uuid.uuid4().hex[:12]}")
    try:
        _epath(probe).write_text("probe")
        _epath(probe).unlink()
    except ImportError as e:
        raise ValueError(f"--output_dir={url} needs the filesystem package for {url.split('://')[0]}:// URLs "
                         f"({e}); for gs:// run pip install 'easytune[gcs]' (gcsfs).") from None
    except Exception as e:
        reason = ("the bucket was not found" if isinstance(e, FileNotFoundError)
                  else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        raise ValueError(f"cannot write to {url} ({reason}); check that the bucket exists and "
                         f"is reachable, that credentials are set (gcloud auth application-default login, or "
                         f"GOOGLE_APPLICATION_CREDENTIALS) and that they may write there.") from None


_UPLOADED: dict[tuple[str, str], tuple[int, int]] = {}  # (local file, URL) -> (size, mtime) last uploaded


def _upload_if_changed(local: str, url: str) -> None:
    stat = os.stat(local)
    if _UPLOADED.get((local, url)) != (stat.st_size, stat.st_mtime_ns):
        upload(local, url)
        _UPLOADED[(local, url)] = (stat.st_size, stat.st_mtime_ns)


def sync_run_files(output_dir: str) -> None:
    """Upload what changed since the last upload among the run mirror's top-level files and its
    TensorBoard folder to `output_dir` (a URL; nothing to do for a local run). Call on process 0."""
    if not is_remote(output_dir):
        return
    local = run_files(output_dir)
    if not os.path.isdir(local):
        return
    for name in sorted(os.listdir(local)):
        path = os.path.join(local, name)
        if os.path.isfile(path) and not name.startswith(".") and not name.endswith(".tmp"):
            _upload_if_changed(path, join(output_dir, name))
        elif name in RUN_FILE_DIRS and os.path.isdir(path):
            for root, _, files in os.walk(path):
                for file in files:
                    full = os.path.join(root, file)
                    _upload_if_changed(full, join(output_dir, os.path.relpath(full, local)))


def clear_mirror(output_dir: str, keep=()) -> None:
    """Empty the local mirror of the run at the URL `output_dir` but for the names in `keep` (its
    lock): a fresh run must not upload an earlier run's files, and a resume fetches the bucket's."""
    local = run_files(output_dir)
    if not os.path.isdir(local):
        return
    for name in os.listdir(local):
        if name not in keep:
            path = os.path.join(local, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for key in [k for k in _UPLOADED if k[0].startswith(local + os.sep)]:
        del _UPLOADED[key]


def fetch_run_files(output_dir: str) -> None:
    """Download a remote run's top-level files and TensorBoard folder into its mirror (for
    `--resume` on any host); nothing to do for a local run."""
    if not is_remote(output_dir) or not isdir(output_dir):
        return
    local = run_files(output_dir)
    os.makedirs(local, exist_ok=True)
    for child in _epath(output_dir).iterdir():
        wanted = child.name in RUN_FILE_DIRS if child.is_dir() else not child.name.startswith(".")
        if wanted:
            _download(child, os.path.join(local, child.name))


@contextlib.contextmanager
def writable_dir(target: str, upload_from_this_process: bool = True):
    """A local directory to write `target`'s files into; for a URL, its mirror, uploaded when the
    block ends (by the process that says so: process 0 on a pod)."""
    if not is_remote(target):
        os.makedirs(target, exist_ok=True)
        yield target
        return
    local = mirror(target)
    if upload_from_this_process:  # the writer clears a stale copy; the others only share the path
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local, exist_ok=True)
    yield local
    if upload_from_this_process:
        upload(local, target)
