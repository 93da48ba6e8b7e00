from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from services.api.deps import ProjectDep, SessionDep
from services.api.limits import string_problem
from services.datasets import service
from services.datasets.schemas import NAME_PATTERN, DatasetRead, DatasetRegister
from services.errors import Invalid, PayloadTooLarge
from shared.config import get_settings
from shared.storage import ObjectStore

router = APIRouter(prefix="/datasets", tags=["datasets"])
_NAME_RE = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$"))

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object", "required": ["name", "file"],
                    "properties": {
                        "name": {"type": "string", "pattern": NAME_PATTERN},
                        "format": {"type": "string", "enum": list(service.FORMATS), "default": "images",
                                   "description": "images: an ImageFolder archive; captioned: the archive also holds "
                                                  "captions.jsonl at its root; text: a corpus (.jsonl of "
                                                  "{text, topic?, split?} or an archive of <topic>/<doc>.txt)"},
                        "file": {"type": "string", "format": "binary",
                                 "description": ".tar, .tar.gz/.tgz or .zip of <class>/<image> or train|test/<class>/"},
                    },
                },
            },
            "application/json": {"schema": DatasetRegister.model_json_schema(),
                                 "example": {"name": "cats", "uri": "s3://lab-data/cats/"}},
        },
    }
}


@router.post("", response_model=DatasetRead, status_code=status.HTTP_201_CREATED, openapi_extra=_UPLOAD_DOC,
             responses={413: {"description": "Upload larger than the configured limit"},
                        422: {"description": "Archive or registration rejected; nothing was stored"}})
async def create_dataset(request: Request, project: ProjectDep, session: SessionDep, response: Response) -> object:
    """Upload an ImageFolder archive (multipart), or register an existing object-store prefix (JSON)."""
    store = ObjectStore()
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            body = DatasetRegister.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
        ds = await run_in_threadpool(service.register_prefix, session=session, project_id=project.id, name=body.name,
                                     uri=body.uri, store=store)
        return DatasetRead.model_validate(ds)
    if not ctype.startswith("multipart/form-data"):
        raise Invalid("send multipart/form-data (name + file) to upload, or application/json (name + uri) to register",
                      loc=["header", "content-type"])
    limit = get_settings().MAX_UPLOAD_BYTES
    # The body is bounded by services.api.limits as it arrives; starlette spools the file part to disk.
    form = await request.form(max_files=1, max_fields=5)
    name, upload, fmt = form.get("name"), form.get("file"), form.get("format") or "images"
    if not isinstance(fmt, str) or fmt not in service.FORMATS:
        raise Invalid(f"format must be one of: {', '.join(service.FORMATS)} (got {str(fmt)[:40]!r})",
                      loc=["body", "format"])
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise Invalid("required: 1-128 letters, digits, '.', '_' or '-'", loc=["body", "name"])
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise Invalid("required: the archive to upload", loc=["body", "file"])
    filename = _check_filename(upload.filename)
    tmpdir = Path(tempfile.mkdtemp(prefix="crucible-upload-"))
    try:
        path = tmpdir / "upload"  # never a client-chosen name ('..', '/', NUL): it only picks the format
        size = await run_in_threadpool(_copy, upload, path, limit)
        if size == 0:
            raise Invalid("the uploaded file is empty", loc=["body", "file"])
        before = service.list_datasets(session=session, project_id=project.id)
        if fmt == "text":
            ds = await run_in_threadpool(service.upload_text, session=session, project_id=project.id, name=name,
                                         path=path, filename=filename, store=store)
        else:
            ds = await run_in_threadpool(service.upload_archive, session=session, project_id=project.id, name=name,
                                         path=path, filename=filename, store=store, format=fmt)
        if any(d.id == ds.id for d in before):
            response.status_code = status.HTTP_200_OK  # same name, same content: nothing new
        return DatasetRead.model_validate(ds)
    finally:
        await upload.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _copy(upload: UploadFile, dest: Path, limit: int) -> int:
    size = 0
    with open(dest, "wb") as out:
        while chunk := upload.file.read(1024 * 1024):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload exceeds the {limit}-byte limit", loc=["body", "file"])
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


def _check_filename(filename: str) -> str:
    """The upload's file name (kept as metadata, and its extension picks the format): short, printable and a
    file name rather than a path."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or len(base) > 255 or string_problem(base):
        raise Invalid("the file name must be a plain name such as data.tar.gz (at most 255 printable characters)",
                      loc=["body", "file"])
    return base


@router.get("", response_model=list[DatasetRead])
def list_datasets(project: ProjectDep, session: SessionDep) -> object:
    return service.list_datasets(session=session, project_id=project.id)


@router.get("/{dataset}", response_model=DatasetRead)
def read_dataset(dataset: str, project: ProjectDep, session: SessionDep) -> object:
    """A dataset by id, name (latest version) or name@version."""
    return service.get(session=session, project_id=project.id, ref=dataset)
