"""`ptqcal report` on tampered run folders: each is one line and exit 2, in bounded memory (no header
is believed, no compressed member inflated), never a traceback."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from ptqcal.cli import main


def _record(folder):
    from ptqcal.evaluate import RunRecord
    from ptqcal.evaluate.record import ConfigInfo, ConfigKind
    from ptqcal.runfolder import RUN, write_marker

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 40)
    logits = (rng.normal(size=(40, 5)) + 3 * np.eye(5)[labels]).astype(np.float32)
    folder.mkdir(parents=True)
    write_marker(folder, RUN)
    RunRecord("m", labels, {"float": logits, "a8w8": logits + 0.1},
              descriptors={"float": ConfigInfo("float", ConfigKind.FLOAT),
                           "a8w8": ConfigInfo("a8w8", ConfigKind.UNIFORM, 8, 8)}).save(folder)
    return folder


def _rewrite(folder, change, compression=zipfile.ZIP_STORED, raw=None):
    with np.load(folder / "logits.npz") as stored:
        arrays = {key: stored[key] for key in stored.files}
    change(arrays)
    with zipfile.ZipFile(folder / "logits.npz", "w", compression=compression) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{key}.npy", (raw or {}).get(key, buffer.getvalue()))


def _huge_header(folder):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1000), }"
    header = (header + " " * (118 - len(header)) + "\n").encode()
    _rewrite(folder, lambda a: None, raw={"a8w8": b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header})


def _run_json(folder, change):
    values = json.loads((folder / "run.json").read_text())
    change(values)
    (folder / "run.json").write_text(json.dumps(values))


MIXED = {"target": "max_confident_swaps", "limit": 0.01, "float_weight_bytes": 100, "images": 10, "confident": 5,
         "act_bits": 8, "layer_bits": [], "max_delta_error": None, "max_latency_ratio": 1.5,
         "steps": [{"moves": 0, "weight_bytes": 100, "confident_swapped": 0.0, "swapped": 0.0,
                    "delta_top1_error": None, "latency_ratio": 1.0}]}

CASES = {
    "a mixed search's cap of the wrong type": lambda f: _run_json(f, lambda v: v.__setitem__(
        "mixed", {**MIXED, "max_latency_ratio": "x"})),
    "a mixed search's step of the wrong type": lambda f: _run_json(f, lambda v: v.__setitem__(
        "mixed", {**MIXED, "steps": [{**MIXED["steps"][0], "latency_ratio": [1]}]})),
    "a corruption that is no corruption": lambda f: _run_json(f, lambda v: v.__setitem__(
        "shift", {"cells": ["../../etc@1"], "configs": ["float"]})),
    "notes of the wrong type": lambda f: _run_json(f, lambda v: v.__setitem__("notes", 5)),
    "configs of the wrong type": lambda f: _run_json(f, lambda v: v.__setitem__("configs", "float")),
    "no float": lambda f: _run_json(f, lambda v: v.__setitem__("configs", ["a8w8"])),
    "JSON nested 100,000 deep": lambda f: (f / "run.json").write_text('{"notes":' + "[" * 100000 + "]" * 100000 + "}"),
    "another class count": lambda f: _rewrite(f, lambda a: a.__setitem__("a8w8", a["a8w8"][:, :3])),
    "float labels": lambda f: _rewrite(f, lambda a: a.__setitem__("labels", a["labels"].astype(float))),
    "missing labels": lambda f: _rewrite(f, lambda a: a.pop("labels")),
    "a label past the classes": lambda f: _rewrite(f, lambda a: a["labels"].__setitem__(0, 7)),
    "NaN logits": lambda f: _rewrite(f, lambda a: a["a8w8"].__setitem__((0, 0), np.nan)),
    "a header asking for 3.6 TiB": _huge_header,
    "compressed members (a zip bomb's way)": lambda f: _rewrite(f, lambda a: None, zipfile.ZIP_DEFLATED),
}


@pytest.mark.parametrize("case", CASES)
def test_a_tampered_run_folder_is_one_line(case, tmp_path, capsys):
    folder = _record(tmp_path / "run")
    CASES[case](folder)
    assert main(["report", str(folder), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged ptqcal run" in err, err
    assert not (tmp_path / "report").exists()
