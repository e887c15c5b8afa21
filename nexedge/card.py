"""ModelCard: the JSON sidecar that travels beside every artifact.

``x.pt`` -> ``x.card.json``, ``x.onnx`` -> ``x.card.json``, ``x.engine`` -> ``x.card.json``.
The card carries everything a later stage must not guess (classes, geometry,
normalisation, operating points, validation score distribution, provenance) and
the sha256 of the artifact it describes, so a stage can refuse an artifact whose
card is missing or belongs to other bytes.

This module is imported by the daemon: Python 3.8, no torch.
"""

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

SCHEMA = "nexedge.card/1"
CROP_MODES = ("center", "five", "ten")
GRAPH_CROPS = ("host",) + CROP_MODES
COLORS = ("gray", "rgb")
PRECISIONS = ("fp32", "fp16", "int8")
KINDS = ("checkpoint", "onnx", "engine")
RESIZE_MODES = ("stretch", "short")
#: ``input.aggregate``: how an image's crops become its score (nexedge.metrics.AGGREGATES).
AGGREGATES = ("mean", "max")
#: Crop modes that score horizontally mirrored crops (TenCrop's second five).
MIRRORED_CROP_MODES = ("ten",)
#: ``operating_points_source.status``: measured on this artifact, or copied from its parent.
OPS_MEASURED = "measured"
OPS_FROM_PARENT = "from_parent"
OPS_STATUSES = (OPS_MEASURED, OPS_FROM_PARENT)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CardError(ValueError):
    """A card is missing, malformed, or does not match its artifact."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        super().__init__(f"{source}: field '{field}': {message}")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def card_path_for(artifact: str) -> str:
    """``dir/x.onnx`` -> ``dir/x.card.json`` (also for ``x.int8.onnx`` -> ``x.int8.card.json``)."""
    base, _ext = os.path.splitext(artifact)
    return base + ".card.json"


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_like_open(path: str) -> None:
    """Give a ``mkstemp`` file (always 0600) the mode ``open()`` would have given it: 0666 & ~umask,
    so a copied card or checkpoint stays readable to the service user where the umask allows."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        chmod_like_open(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_object(field: str, values: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """``values`` as a plain dict, or a CardError naming the value JSON cannot hold."""
    out = dict(values)
    try:
        json.dumps(out)
    except (TypeError, ValueError) as e:
        raise CardError(source, field, f"expected JSON-serialisable values: {e}") from None
    return out


class ModelCard:
    """In-memory view of a card. ``data`` is the plain JSON dict; accessors read it.

    Sections (see docs/modelcard.md):
    ``artifact`` {file, sha256, kind, precision}; ``parent`` {file, sha256} or None;
    ``classes``, ``good_class``; ``input`` {color, resize [H, W], crop [h, w],
    crop_mode, mean, std}; ``graph`` {crops, input_name, output_names, max_batch,
    quantization}; ``operating_points`` list of {target_tpr, threshold, tpr, fpr,
    tpr_lower95, n_defects, n_good}; ``val_scores`` {edges, good, defect};
    ``image_stats`` {name: {mean, std}}; ``operating_points_source`` {status
    (measured | from_parent), split, n_good, n_defects, artifact_sha256, crop_mode,
    backend, ...}; ``metrics``; ``provenance``.
    """

    def __init__(self, data: Dict[str, Any], source: str = "<memory>") -> None:
        self.data = data
        self.source = source
        self._editing = 0

    # -- construction -------------------------------------------------
    @classmethod
    def new(
        cls,
        classes: Sequence[str],
        good_class: str = "good",
        resize: Sequence[int] = (255, 255),
        crop: Sequence[int] = (224, 224),
        crop_mode: str = "center",
        color: str = "gray",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        kind: str = "checkpoint",
        precision: str = "fp32",
        resize_mode: str = "stretch",
        aggregate: str = "mean",
    ) -> "ModelCard":
        data = {
            "schema": SCHEMA,
            "created": _utcnow(),
            "artifact": {"file": None, "sha256": None, "kind": kind, "precision": precision},
            "parent": None,
            "classes": list(classes),
            "good_class": good_class,
            "input": {
                "color": color,
                "resize": [int(resize[0]), int(resize[1])],
                "crop": [int(crop[0]), int(crop[1])],
                "crop_mode": crop_mode,
                "resize_mode": resize_mode,
                "aggregate": aggregate,
                "mean": [float(x) for x in mean],
                "std": [float(x) for x in std],
            },
            "graph": {"crops": "host", "input_name": "input", "output_names": ["logits"], "max_batch": None},
            "operating_points": [],
            "val_scores": None,
            "image_stats": None,
            "metrics": {},
            "provenance": {},
        }
        card = cls(data)
        card.validate()
        return card

    def derive(self, kind: str, precision: Optional[str] = None) -> "ModelCard":
        """A copy for a child artifact; ``parent`` becomes this card's artifact."""
        data = copy.deepcopy(self.data)
        parent = self.data["artifact"]
        data["parent"] = {"file": parent.get("file"), "sha256": parent.get("sha256"), "kind": parent.get("kind")}
        data["artifact"] = {
            "file": None,
            "sha256": None,
            "kind": kind,
            "precision": precision or parent.get("precision", "fp32"),
        }
        data["created"] = _utcnow()
        src = data.get("operating_points_source")
        if src and data.get("operating_points"):
            # The child's numbers may differ (crops, precision, engine): until `nexedge thresholds`
            # re-measures them on the child, they are the parent's and say so.
            data["operating_points_source"] = dict(
                status=OPS_FROM_PARENT, parent_status=src.get("status"),
                **{k: v for k, v in src.items() if k not in ("status", "parent_status")})
        if isinstance(data.get("cascade"), dict):
            # The child's scores differ: its band must be re-measured on it before a daemon uses it.
            data["cascade"] = dict(data["cascade"], status=OPS_FROM_PARENT)
        return ModelCard(data)

    # -- accessors ----------------------------------------------------
    @property
    def classes(self) -> List[str]:
        return list(self.data["classes"])

    @property
    def good_class(self) -> str:
        return self.data["good_class"]

    @property
    def good_index(self) -> int:
        return self.data["classes"].index(self.data["good_class"])

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def input(self) -> Dict[str, Any]:
        return self.data["input"]

    @property
    def graph(self) -> Dict[str, Any]:
        return self.data["graph"]

    @property
    def precision(self) -> str:
        return self.data["artifact"]["precision"]

    @property
    def sha256(self) -> Optional[str]:
        return self.data["artifact"].get("sha256")

    @property
    def model_id(self) -> str:
        """Short id for logs and verdicts: ``<file stem>@<sha8>``."""
        art = self.data["artifact"]
        stem = os.path.basename(art.get("file") or "model")
        return "{}@{}".format(stem, (art.get("sha256") or "unknown")[:8])

    @property
    def runtime_crop_mode(self) -> str:
        """The crop mode the artifact runs: the graph's crops, or the host's ``input.crop_mode``."""
        crops = self.data["graph"].get("crops", "host")
        return self.data["input"]["crop_mode"] if crops == "host" else crops

    @property
    def aggregate(self) -> str:
        """How the artifact turns an image's crops into one score: ``mean`` of the logits (cards
        without the field) or ``max`` (the crop with the highest defect score)."""
        return str(self.data["input"].get("aggregate", "mean"))

    @property
    def train_flip(self) -> Optional[str]:
        """The random mirrors the model was trained with (``none``, ``h``, ``v``, ``hv``); None when the
        card predates that record."""
        flip = (self.data.get("provenance") or {}).get("flip")
        return flip if isinstance(flip, str) else None

    def mirror_problem(self, crop_mode: Optional[str] = None) -> Optional[Dict[str, str]]:
        """Whether ``crop_mode`` (default: the one the artifact runs) scores mirrored crops the model
        may never have seen: None when it does not or the model was trained with horizontal mirrors,
        else {"kind": "unseen" | "unknown", "message": ...}."""
        mode = crop_mode or self.runtime_crop_mode
        if mode not in MIRRORED_CROP_MODES:
            return None
        flip = self.train_flip
        if (flip is not None and "h" in flip) or (self.data.get("provenance") or {}).get("train_crop") in \
                MIRRORED_CROP_MODES:  # trained on mirrors, or on TenCrop's own mirrored crops
            return None
        if flip is None:
            return {"kind": "unknown", "message": (
                f"{self.source}: {mode!r} crops score five horizontally mirrored crops, and the card does not "
                "record whether the model was trained with mirrors (`nexedge train --flip h`); if it was not, "
                "those crops are images it never saw (magnetic tiles: TenCrop FPR at TPR 100 % 80 % vs 25 % "
                "CenterCrop). Compare with `nexedge export --crops auto`")}
        return {"kind": "unseen", "message": (
            f"{self.source}: {mode!r} crops score five horizontally mirrored crops, but the model was trained with "
            f"--flip {flip}: they are images it never saw (magnetic tiles: TenCrop FPR at TPR 100 % 80 % vs 25 % "
            "CenterCrop). Use center or five crops (`nexedge export --crops auto` measures them), or train with "
            "--flip h where a mirrored image keeps its label")}

    def selection_warning(self) -> Optional[str]:
        """A message when the operating points were measured on the split that also picked the model
        (``nexedge train --select val_auc`` picks the epoch on val, then val sets the threshold): the
        threshold then rests on the images that made the model look best, and its promises are
        optimistic. None otherwise."""
        prov = self.data.get("provenance") or {}
        split = self.ops_source.get("split")
        if not self.operating_points or prov.get("select") != "val_auc" or not prov.get("best_of_run") \
                or split != prov.get("selected_on", "val"):
            return None
        return (f"the operating points were measured on {split!r}, the split that also picked this checkpoint "
                "(--select val_auc): the threshold and its TPR bound are optimistic (in one measurement the real "
                "escape rate was 2.85-4.33 % against 2.27 % claimed). Train with --select last, measure on a split "
                "that did not pick the model, or use `nexedge train --cv K`")

    @property
    def ops_source(self) -> Dict[str, Any]:
        """``operating_points_source`` ({} when the card predates it)."""
        return dict(self.data.get("operating_points_source") or {})

    def ops_status_line(self) -> str:
        """One line for logs: whether the operating points were measured on this artifact."""
        src = self.ops_source
        if not self.operating_points:
            return "no operating points"
        if not src:
            return "operating points of unknown provenance (card predates measurement records)"
        where = "split {!r}, {} good / {} defect images, crop mode {}, backend {}".format(
            src.get("split"), src.get("n_good"), src.get("n_defects"), src.get("crop_mode"), src.get("backend"))
        if src.get("status") == OPS_MEASURED:
            return f"operating points measured on this artifact ({where})"
        return f"operating points from parent (not re-measured) ({where})"

    def crop_mode_mismatch(self, runs: Optional[str] = None) -> Optional[str]:
        """A message when the operating points were measured with another crop mode than the
        artifact runs (``runs``, default :attr:`runtime_crop_mode`) or with an unknown one, else None."""
        if not self.operating_points:
            return None
        measured = self.ops_source.get("crop_mode")
        runs = runs or self.runtime_crop_mode
        if measured is None:
            return (f"the card does not say which crop mode its operating points were measured with; the "
                    f"artifact runs {runs!r}: re-measure with `nexedge thresholds`")
        if measured != runs:
            return (f"operating points were measured with crop mode {measured!r} but the artifact runs "
                    f"{runs!r}: re-measure with `nexedge thresholds`")
        agg = self.ops_source.get("aggregate")
        if agg is not None and agg != self.aggregate and runs != "center":
            return (f"operating points were measured with crop aggregate {agg!r} but the card says "
                    f"{self.aggregate!r}: re-measure with `nexedge thresholds`")
        return None

    @property
    def operating_points(self) -> List[Dict[str, Any]]:
        return list(self.data.get("operating_points") or [])

    def operating_point(self, target_tpr: float) -> Dict[str, Any]:
        """The operating point for ``target_tpr`` (fraction, 0.991 or percent, 99.1)."""
        t = target_tpr / 100.0 if target_tpr > 1.0 else target_tpr
        for op in self.operating_points:
            if abs(float(op["target_tpr"]) - t) < 1e-9:
                return op
        have = [op["target_tpr"] for op in self.operating_points]
        raise CardError(
            self.source, "operating_points", f"no operating point for target TPR {t} (card has {have})"
        )

    # -- writers: the only way other modules change a card --------------
    # Each one validates the whole card when it returns (or at the end of an ``edit()`` block) and
    # leaves the card as it was when that fails, so a bad value is a CardError where it is written.

    @contextlib.contextmanager
    def edit(self) -> Iterator["ModelCard"]:
        """Group writes that only agree together (new operating points and the histogram they were
        measured on): validated once at the end; on any error the card is left as it was."""
        before = copy.deepcopy(self.data)
        self._editing += 1
        try:
            yield self
            if self._editing == 1:
                self.validate()
        except BaseException:
            self.data.clear()
            self.data.update(before)
            raise
        finally:
            self._editing -= 1

    def _write(self, **sections: Any) -> None:
        with self.edit():
            self.data.update(sections)

    def set_operating_points(self, points: Sequence[Mapping[str, Any]], source: Mapping[str, Any]) -> None:
        """Operating points (``metrics.operating_points``) and where they were measured
        (``operating_points_source``: status, split, n_good, n_defects, crop_mode, backend, ...)."""
        self._write(operating_points=[dict(p) for p in points], operating_points_source=dict(source))

    def set_score_reference(self, val_scores: Optional[Mapping[str, Any]], image_stats: Any = ...) -> None:
        """The validation score histogram (``metrics.score_histogram``) and, when given, the image
        statistics (``preprocess.reference_image_stats``) the shift monitor compares against."""
        sections: Dict[str, Any] = {"val_scores": None if val_scores is None else dict(val_scores)}
        if image_stats is not ...:
            sections["image_stats"] = image_stats
        self._write(**sections)

    def update_ops_source(self, **fields: Any) -> None:
        """Add or change fields of ``operating_points_source`` (e.g. the artifact's sha256 once written)."""
        self._write(operating_points_source=dict(self.ops_source, **fields))

    def mark_ops_from_parent(self, reason: str) -> None:
        """Say that the operating points are the parent's, not re-measured on this artifact, and why."""
        if not self.operating_points:
            return
        src = self.ops_source
        status = src.get("status")
        src.update(status=OPS_FROM_PARENT, not_measured_reason=reason)
        if status and status != OPS_FROM_PARENT:
            src["parent_status"] = status
        self._write(operating_points_source=src)

    @property
    def cascade(self) -> Optional[Dict[str, Any]]:
        """The ``cascade`` section (a copy), or None."""
        sec = self.data.get("cascade")
        return copy.deepcopy(sec) if isinstance(sec, dict) else None

    def set_cascade(self, section: Optional[Mapping[str, Any]]) -> None:
        """The cascade band section (``nexedge.runtime.cascade.measure_section``), or None to drop it."""
        self._write(cascade=None if section is None else dict(section))

    def mark_cascade_from_parent(self, reason: str) -> None:
        """Keep the cascade band but say it was not re-measured on this artifact, and why."""
        if self.cascade is not None:
            self._write(cascade=dict(self.cascade, status=OPS_FROM_PARENT, not_measured_reason=reason))

    def set_graph(self, crops: str, input_name: str, output_names: Sequence[str],
                  max_batch: Optional[int]) -> None:
        """The artifact's graph interface (replaces the section: a new graph has no quantization)."""
        self._write(graph={"crops": crops, "input_name": input_name, "output_names": list(output_names),
                           "max_batch": max_batch})

    def update_graph(self, **fields: Any) -> None:
        """Change fields of ``graph`` (``max_batch`` of an engine, ``quantization`` of an INT8 model)."""
        self._write(graph=dict(self.graph, **fields))

    def set_aggregate(self, aggregate: str) -> None:
        """How the artifact turns an image's crops into one score (``input.aggregate``)."""
        self._write(input=dict(self.input, aggregate=aggregate))

    @property
    def metrics(self) -> Dict[str, Any]:
        """The ``metrics`` section (a copy)."""
        return copy.deepcopy(self.data.get("metrics") or {})

    def set_metrics(self, values: Mapping[str, Any]) -> None:
        """Replace ``metrics`` (a child's metrics are not its parent's)."""
        self._write(metrics=_json_object("metrics", values, self.source))

    def update_metrics(self, **values: Any) -> None:
        self._write(metrics=_json_object("metrics", dict(self.metrics, **values), self.source))

    @property
    def provenance(self) -> Dict[str, Any]:
        """The ``provenance`` section (a copy)."""
        return copy.deepcopy(self.data.get("provenance") or {})

    def set_provenance(self, values: Mapping[str, Any]) -> None:
        self._write(provenance=_json_object("provenance", values, self.source))

    def update_provenance(self, **values: Any) -> None:
        self._write(provenance=_json_object("provenance", dict(self.provenance, **values), self.source))

    def drop_provenance(self, *keys: str) -> None:
        """Remove ``keys`` from ``provenance`` (those that do not hold for this artifact)."""
        self._write(provenance={k: v for k, v in self.provenance.items() if k not in keys})

    def set_cv(self, section: Mapping[str, Any]) -> None:
        """The cross-validation record of an out-of-fold ensemble (``nexedge train --cv``)."""
        self._write(cv=_json_object("cv", section, self.source))

    def set_crop_selection(self, section: Mapping[str, Any]) -> None:
        """How ``--crops auto`` chose the crop mode and aggregate, with the candidates it compared."""
        self._write(crop_selection=_json_object("crop_selection", section, self.source))

    # -- validation ---------------------------------------------------
    def _fail(self, field: str, message: str) -> None:
        raise CardError(self.source, field, message)

    def validate(self) -> "ModelCard":
        """Check structure and types; raise :class:`CardError` naming the field."""
        d = self.data
        if not isinstance(d, dict):
            self._fail("<root>", f"expected a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            self._fail("schema", "expected {!r}, got {!r}".format(SCHEMA, d.get("schema")))
        for key in ("artifact", "classes", "good_class", "input", "graph"):
            if key not in d:
                self._fail(key, "missing")
        art = d["artifact"]
        if not isinstance(art, dict):
            self._fail("artifact", "expected an object")
        if art.get("kind") not in KINDS:
            self._fail("artifact.kind", "expected one of {}, got {!r}".format(KINDS, art.get("kind")))
        if art.get("precision") not in PRECISIONS:
            self._fail("artifact.precision", "expected one of {}, got {!r}".format(PRECISIONS, art.get("precision")))
        classes = d["classes"]
        if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
            self._fail("classes", f"expected a list of two or more non-empty class names, got {classes!r}")
        if len(set(classes)) != len(classes):
            self._fail("classes", f"duplicate class names in {classes!r}")
        if d["good_class"] not in classes:
            self._fail("good_class", "{!r} is not one of the classes {!r}".format(d["good_class"], classes))
        inp = d["input"]
        if inp.get("color") not in COLORS:
            self._fail("input.color", "expected one of {}, got {!r}".format(COLORS, inp.get("color")))
        for key in ("resize", "crop"):
            v = inp.get(key)
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)):
                self._fail("input." + key, f"expected [height, width] of positive integers, got {v!r}")
        if inp["crop"][0] > inp["resize"][0] or inp["crop"][1] > inp["resize"][1]:
            self._fail("input.crop", "crop {} larger than resize {}".format(inp["crop"], inp["resize"]))
        if inp.get("crop_mode") not in CROP_MODES:
            self._fail("input.crop_mode", "expected one of {}, got {!r}".format(CROP_MODES, inp.get("crop_mode")))
        if inp.get("aggregate", "mean") not in AGGREGATES:
            self._fail("input.aggregate", "expected one of {}, got {!r}".format(AGGREGATES, inp.get("aggregate")))
        for key in ("mean", "std"):
            v = inp.get(key)
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                self._fail("input." + key, f"expected three numbers, got {v!r}")
        if any(float(x) <= 0 for x in inp["std"]):
            self._fail("input.std", "must be positive, got {!r}".format(inp["std"]))
        g = d["graph"]
        if g.get("crops") not in GRAPH_CROPS:
            self._fail("graph.crops", "expected one of {}, got {!r}".format(GRAPH_CROPS, g.get("crops")))
        mb = g.get("max_batch")
        if mb is not None and not (isinstance(mb, int) and mb > 0):
            self._fail("graph.max_batch", f"expected a positive integer or null, got {mb!r}")
        if inp.get("resize_mode", "stretch") not in RESIZE_MODES:
            self._fail("input.resize_mode",
                       "expected one of {}, got {!r}".format(RESIZE_MODES, inp.get("resize_mode")))
        ops = d.get("operating_points") or []
        if not isinstance(ops, list):
            self._fail("operating_points", f"expected a list, got {type(ops).__name__}")
        for i, op in enumerate(ops):
            if not isinstance(op, dict):
                self._fail(f"operating_points[{i}]", f"expected an object, got {op!r}")
            for key in ("target_tpr", "threshold"):
                v = op.get(key)
                # bool is an int; Infinity / NaN parse from JSON as floats
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
                        or not 0.0 < float(v) <= 1.0:
                    self._fail(f"operating_points[{i}].{key}",
                               f"expected a finite number in (0, 1], got {v!r}"
                               + (" (a threshold above 1 or infinite PASSes every device)" if key == "threshold"
                                  else ""))
            for key in ("tpr", "fpr", "tpr_lower95"):
                v = op.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not 0.0 <= float(v) <= 1.0):
                    self._fail(f"operating_points[{i}].{key}", f"expected null or a number in [0, 1], got {v!r}")
        order = sorted(range(len(ops)), key=lambda j: float(ops[j]["target_tpr"]))
        for a_i, b_i in zip(order, order[1:]):
            a, b = ops[a_i], ops[b_i]
            if float(a["target_tpr"]) == float(b["target_tpr"]):
                self._fail(f"operating_points[{b_i}].target_tpr", "duplicate target {}".format(b["target_tpr"]))
            if float(b["threshold"]) > float(a["threshold"]):
                self._fail(f"operating_points[{b_i}].threshold",
                           "a higher target TPR needs a threshold no higher than a lower target's: "
                           "{} at TPR {} but {} at TPR {}".format(b["threshold"], b["target_tpr"],
                                                                 a["threshold"], a["target_tpr"]))
        vs = d.get("val_scores")
        if vs is not None:
            if not isinstance(vs, dict):
                self._fail("val_scores", "expected an object")
            edges, good, defect = vs.get("edges"), vs.get("good"), vs.get("defect")
            if not (isinstance(edges, list) and isinstance(good, list) and len(good) == len(edges) - 1):
                self._fail("val_scores", "expected edges (n+1) and good counts (n)")
            if defect is not None and (not isinstance(defect, list) or len(defect) != len(edges) - 1):
                self._fail("val_scores.defect", f"expected {len(edges) - 1} counts, got {defect!r}")
            for key, counts in (("good", good), ("defect", defect or [])):
                if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                    self._fail("val_scores." + key, f"expected non-negative integer counts, got {counts!r}")
            lg = vs.get("logit")
            if lg is not None:  # the same scores on log-odds bins (shift monitor reference)
                le = lg.get("edges") if isinstance(lg, dict) else None
                if not (isinstance(le, list) and len(le) >= 3 and all(isinstance(lg.get(k), list)
                                                                     and len(lg[k]) == len(le) - 1
                                                                     for k in ("good", "defect"))):
                    self._fail("val_scores.logit", "expected edges (n+1), good and defect counts (n)")
                if sum(lg["good"]) != sum(good) or sum(lg["defect"]) != sum(defect or []):
                    self._fail("val_scores.logit", "holds other counts than val_scores (the same scores binned "
                               "twice must add up the same)")
            if ops:
                for key, field in (("good", "n_good"), ("defect", "n_defects")):
                    n = ops[0].get(field)
                    counts = vs.get(key)
                    if isinstance(n, int) and counts is not None and sum(counts) != n:
                        self._fail("val_scores." + key,
                                   f"histogram holds {sum(counts)} scores but the operating points were "
                                   f"measured on {n} ({field}): histogram and operating points disagree")
        self._validate_cascade(d.get("cascade"))
        src = d.get("operating_points_source")
        if src is not None:
            if not isinstance(src, dict):
                self._fail("operating_points_source", "expected an object")
            if src.get("status") not in OPS_STATUSES:
                self._fail("operating_points_source.status",
                           "expected one of {}, got {!r}".format(OPS_STATUSES, src.get("status")))
            if src.get("crop_mode") is not None and src.get("crop_mode") not in CROP_MODES:
                self._fail("operating_points_source.crop_mode",
                           "expected one of {}, got {!r}".format(CROP_MODES, src.get("crop_mode")))
        return self

    def _validate_cascade(self, sec: Any) -> None:
        """``cascade`` (see nexedge.runtime.cascade): bands with 0 <= lo <= threshold <= hi <= 1."""
        if sec is None:
            return
        if not isinstance(sec, dict):
            self._fail("cascade", f"expected an object, got {type(sec).__name__}")
        if sec.get("status") not in OPS_STATUSES:
            self._fail("cascade.status", "expected one of {}, got {!r}".format(OPS_STATUSES, sec.get("status")))
        bands = sec.get("bands") or []
        if not isinstance(bands, list):
            self._fail("cascade.bands", f"expected a list, got {type(bands).__name__}")
        for i, b in enumerate(bands):
            vals = [b.get(k) if isinstance(b, dict) else None for k in ("lo", "threshold", "hi")]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0
                       for v in vals) or not vals[0] <= vals[1] <= vals[2]:
                self._fail(f"cascade.bands[{i}]", "expected 0 <= lo <= threshold <= hi <= 1, got lo={!r} "
                           "threshold={!r} hi={!r}".format(*vals))

    # -- I/O -----------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False) + "\n"

    def save_for(self, artifact: str, parent: Optional[str] = None) -> str:
        """Stamp the artifact's name and sha256 (and the parent's) and write the sidecar."""
        self.data["artifact"]["file"] = os.path.basename(artifact)
        self.data["artifact"]["sha256"] = sha256_file(artifact)
        if parent is not None:
            self.data["parent"] = {
                "file": os.path.basename(parent),
                "sha256": sha256_file(parent),
                "kind": (self.data.get("parent") or {}).get("kind"),
            }
        self.validate()
        path = card_path_for(artifact)
        self.source = path
        atomic_write_bytes(path, self.to_json().encode("utf-8"))
        return path


def read_card(path: str) -> ModelCard:
    """Read and validate a card file (not its artifact)."""
    if not os.path.exists(path):
        raise CardError(path, "<file>", "card file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise CardError(path, "<file>", f"not valid JSON: {e}") from None
    return ModelCard(data, source=path).validate()


def load_card(artifact: str, verify: bool = True) -> ModelCard:
    """Card for ``artifact``; with ``verify`` the artifact's sha256 must match the card."""
    path = card_path_for(artifact)
    if not os.path.exists(path) and not os.path.exists(artifact):
        raise FileNotFoundError(f"{artifact}: no such file (expected a model artifact with its card beside it)")
    if not os.path.exists(path):
        raise CardError(path, "<file>", f"card missing for artifact {artifact} (every artifact needs its card)")
    card = read_card(path)
    if verify:
        if not os.path.exists(artifact):
            raise CardError(path, "artifact.file", f"artifact {artifact} not found")
        actual = sha256_file(artifact)
        expected = card.data["artifact"].get("sha256")
        if actual != expected:
            raise CardError(
                path,
                "artifact.sha256",
                f"card says {expected} but {artifact} has sha256 {actual} (artifact changed or card belongs to another file)",
            )
    return card


def verify_parent(child: ModelCard, parent_artifact: str) -> None:
    """Raise unless ``child``'s parent sha256 is that of ``parent_artifact``."""
    parent = child.data.get("parent") or {}
    actual = sha256_file(parent_artifact)
    if parent.get("sha256") != actual:
        raise CardError(
            child.source,
            "parent.sha256",
            "card names parent sha256 {} but {} has {}".format(parent.get("sha256"), parent_artifact, actual),
        )
