"""`python tests/gcs_emulator.py <gcp-storage-emulator arguments>`: the PyPI `gcp-storage-emulator`
server with one gap to real GCS closed. GCS answers every media download with `x-goog-generation`
and `x-goog-metageneration` headers, and tensorstore (orbax's storage layer) reads the object's
generation from them ("Malformed StorageGeneration" without); the emulator does not send them. This
wrapper adds them to its download handler before its routes are built, and changes nothing else."""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the handler has set its status
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch: its routes bind the handler)

if __name__ == "__main__":
    sys.exit(main())
