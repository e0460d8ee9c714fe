"""Files on local or shared storage: a local path, or any URI pyarrow understands (s3://, gs://,
file://). The stage-I cache and the Ray runner read and write through these, so every node
of a cluster sees the same files."""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pyarrow.fs

from .failures import writing


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" not in uri:
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_text(uri: str) -> str | None:
    """A small file; None when it does not exist."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def write_text(uri: str, text: str) -> None:
    """Written to a temporary name, then moved: a reader never sees half a file (on object
    stores the move is a copy, which is still whole)."""
    fs, path = filesystem(uri)
    fs.create_dir(_parent(path), recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with _writing(fs, uri, tmp):
        with fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        fs.move(tmp, path)


def upload(local: Path, uri: str) -> None:
    """Copy a local file to `uri`, through a temporary name and a move."""
    fs, path = filesystem(uri)
    fs.create_dir(_parent(path), recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with _writing(fs, uri, tmp):
        pyarrow.fs.copy_files(str(Path(local).resolve()), tmp, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
        fs.move(tmp, path)


def _writing(fs, uri: str, tmp: str):
    """A write to `uri` through `tmp` (risda.trainer.failures.writing): on a failure tmp is deleted; a
    storage fault is StorageFault, and the file at `uri` is as it was (the move is the last step)."""
    def remove():
        if fs.get_file_info(tmp).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(tmp)
    return writing(uri, "what was there before is intact: free space and rerun the same command", remove_tmp=remove)


def download(uri: str, local: Path) -> Path:
    fs, path = filesystem(uri)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(local.resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def sha256(uri: str, chunk: int = 8 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in chunks: a local path or a URI."""
    fs, path = filesystem(uri)
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def move(uri: str, dest: str) -> None:
    """Move a file within one storage (a rename on a path; a copy and a delete on object stores)."""
    fs, path = filesystem(uri)
    fs.create_dir(_parent(filesystem(dest)[1]), recursive=True)
    fs.move(path, filesystem(dest)[1])


def files(uri: str) -> list[str]:
    """The names of the files directly in a folder (none when it does not exist)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File)


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_file(path)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)
