"""A small captioned archive (ImageFolder + captions.jsonl) from the scenes generator, for API and e2e tests."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image

from shared.data import scenes


def captioned_entries(n_train: int = 96, n_test: int = 32, *, size: int = 24) -> dict[str, bytes]:
    """``train|test/<shape>/<i>.png`` and ``captions.jsonl`` (uncaptioned scenes left out of it)."""
    entries: dict[str, bytes] = {}
    rows = []
    seen: set[str] = set()
    for split, part in (("train", scenes.generate(n_train, 31, held_out=False)),
                        ("test", scenes.generate(n_test, 32, held_out=True))):
        for i in range(len(part.images)):
            shape = scenes.SHAPES[part.attributes["shape"][i]]
            if split == "train":
                seen.add(shape)
            elif shape not in seen:  # every test class needs training images
                continue
            path = f"{split}/{shape}/{i:04d}.png"
            buf = io.BytesIO()
            Image.fromarray(part.images[i]).resize((size, size)).save(buf, format="PNG")
            entries[path] = buf.getvalue()
            if part.captions[i]:
                attrs = {k: scenes.ATTRIBUTES[k][int(v[i])] for k, v in part.attributes.items()}
                rows.append({"image": path, "caption": part.captions[i], "attributes": attrs})
    entries["captions.jsonl"] = "\n".join(json.dumps(r) for r in rows).encode()
    return entries


def tar_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
