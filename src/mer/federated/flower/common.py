"""What both of mer's Flower apps use: the config, record conversions, the node and its disk.

Flower runs every message a SuperNode receives in a fresh ClientApp process, so whatever a
node needs is either cheap to import or read from the node's own disk:

- the composed config, cached per run (:func:`node_config`) under the node's ``state-dir``;
- the lab's prepared samples, in a node-local cache (:func:`node_samples`): the flow images
  as a memory-mapped ``.npy``, the table beside it, written once (atomically) per data
  config under ``<paths.cache_dir>/flower-node/<hash>``;
- the node's state of a run (:class:`NodeStore`): FedBN's last local model, SCAFFOLD's control
  (and the pending one), the DP-SGD accountant, the personalised model, secagg's parties;
  Flower keeps them in ``context.state`` in the SuperNode's memory, mer also writes them to
  ``<state-dir>/run-<run id>/<client>.state`` after every message, so a restarted SuperNode
  resumes where it stopped.

Nothing here imports torch or Lightning at module level (the training code is imported when
a message needs it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import pickle
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from omegaconf import DictConfig, OmegaConf

from mer.paths import CONF_DIR

if TYPE_CHECKING:
    from mer.data.samples import FlowSamples
    from mer.federated.loop import FederatedRun
    from mer.federated.partition import ClientData

log = logging.getLogger(__name__)
CONFIG_DIR = str(CONF_DIR)
Weights = list[np.ndarray]
SAMPLES_FORMAT = 1  # bump when the node cache's layout changes


def compose_config(overrides: str | list[str], whole_federation: bool = True) -> DictConfig:
    """mer's Hydra config for a string (or list) of overrides, as ``mer.run`` composes it,
    checked (``whole_federation=False``: a lab's own config, its data maybe its own only)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mer.config_check import check_config

    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=items)
    if not cfg.get("federated"):
        raise ValueError(f"the Flower apps need a federated config; overrides {items} have "
                         "none (add e.g. federated=fedavg or +experiment=fed_psyau)")
    check_config(cfg, whole_federation)  # ConfigError: every bad value, before any data
    from mer.data.generate.checks import refuse_for_flower

    refuse_for_flower(cfg)  # a SuperNode does not augment its lab's split yet
    return cfg


def _arrays(weights: Weights) -> ArrayRecord:
    return ArrayRecord([np.ascontiguousarray(w) for w in weights])


def _weights(record: ArrayRecord, like: Weights) -> Weights:
    """The arrays of ``record`` in the shapes of ``like`` (0-d buffers arrive as 1-d)."""
    arrays = record.to_numpy_ndarrays()
    if len(arrays) != len(like):
        raise ValueError(f"{len(arrays)} arrays received for a model of {len(like)}: same "
                         "model config on the server and every SuperNode?")
    return [a.reshape(w.shape) for a, w in zip(arrays, like)]


class KeptOnNode:
    """Stands, on the server, for a client's personalised model that only its node holds
    (secure aggregation with P-FedProx); evaluate asks the node to use its own."""


# -- the node ----------------------------------------------------------------------------------


@dataclass
class Node:
    """One lab's view: its config, data, partition and a FederatedRun for the shared code."""

    cfg: DictConfig
    run: FederatedRun
    client: ClientData
    index: int


_NODES: dict[str, Node] = {}


def run_dir(context: Context) -> Path | None:
    """``<state-dir>/run-<run id>``: this node's folder for the run (None: no ``state-dir``
    in the node config, so nothing is kept on disk)."""
    root = dict(context.node_config).get("state-dir")
    if root in (None, ""):
        return None
    return Path(str(root)).expanduser() / f"run-{int(context.run_id)}"


def node_config(overrides: str, node_cfg: Mapping, folder: Path | None) -> DictConfig:
    """The lab's config of this run: composed and checked once, then read back from
    ``folder/config-<hash>.yaml`` by the run's later messages (each a fresh process)."""
    own_key = node_cfg.get("privacy-secret-context")
    path = None
    if folder is not None:
        digest = hashlib.sha256(json.dumps([overrides, own_key], default=str).encode())
        path = folder / f"config-{digest.hexdigest()[:16]}.yaml"
        if path.exists():
            cfg = OmegaConf.load(path)
            OmegaConf.set_struct(cfg, True)  # as Hydra's compose leaves it
            return cfg
    cfg = compose_config(overrides, whole_federation=False)  # a lab: maybe its own data only
    if own_key is not None and (cfg.get("privacy") or {}).get("name") == "ckks":
        overrides += f" privacy.secret_context={shlex.quote(str(own_key))}"  # the lab's wins
        cfg = compose_config(overrides, whole_federation=False)
    if path is not None:
        from mer.data.io import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, OmegaConf.to_yaml(cfg))
    return cfg


def node_from_context(context: Context) -> Node:
    """The node's config, data and client (by ``client-name`` or ``partition-id``), cached."""
    node_cfg = dict(context.node_config)
    overrides = " ".join(str(x) for x in (context.run_config.get("overrides", ""),
                                          node_cfg.get("overrides", "")))
    key = json.dumps([context.run_id, overrides, node_cfg.get("client-name"),
                      node_cfg.get("partition-id")], default=str)
    if key in _NODES:
        return _NODES[key]
    cfg = node_config(overrides, node_cfg, run_dir(context))
    check_pins(node_cfg, cfg, str(node_cfg.get("client-name",
                                               f"partition-id={node_cfg.get('partition-id')}")))
    samples = node_samples(cfg)
    clients = make_clients(cfg, samples, whole_federation=False)
    names = [c.name for c in clients]
    if "client-name" in node_cfg:
        name = str(node_cfg["client-name"])
        if name not in names:
            raise ValueError(f"node config client-name={name!r} is not a client of this "
                             f"config; the clients are {names}")
        index = names.index(name)
    elif "partition-id" in node_cfg:
        index = int(node_cfg["partition-id"])
        if not 0 <= index < len(clients):
            raise ValueError(f"node config partition-id={index} out of range: {len(clients)} "
                             f"clients {names}")
    else:
        raise ValueError("set the SuperNode's client with --node-config 'client-name=\"NAME\"' "
                         "or 'partition-id=N'")
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from mer.federated.loop import FederatedRun

    node = Node(cfg, FederatedRun(cfg, samples, clients), clients[index], index)
    _NODES[key] = node
    return node


def make_clients(cfg: DictConfig, samples: FlowSamples, whole_federation: bool = True
                 ) -> list[ClientData]:
    """:func:`mer.federated.loop.make_clients`, imported when first needed."""
    from mer.federated.loop import make_clients as make

    return make(cfg, samples, whole_federation=whole_federation)


def check_pins(node_config: Mapping, cfg: DictConfig, lab: str) -> None:
    """Refuse a run whose privacy differs from what the lab pinned in its node config.

    ``privacy="secagg"`` (or ``ckks``, ``dp``, ...): the lab takes part only in runs of that
    mode, so a server cannot downgrade it (to plaintext, say) by submitting another run
    config. ``privacy-secret-context="PATH"``: the lab's CKKS key file; it replaces any key the
    run names (:func:`node_from_context`) and the lab refuses runs that are not ckks.
    """
    privacy = cfg.get("privacy") or {}
    name = str(privacy.get("name", "none")) if privacy else "none"
    pinned = node_config.get("privacy")
    if pinned is not None and str(pinned) != name:
        raise PermissionError(
            f"lab {lab!r} pins privacy={pinned} in its SuperNode's node config; this run asks "
            f"privacy={name}: refused. Submit the run with privacy={pinned} (or the lab "
            "removes its pin)")
    key = node_config.get("privacy-secret-context")
    if key is not None:
        have = privacy.get("secret_context") if privacy else None
        same = have is not None and \
            Path(str(have)).expanduser().resolve() == Path(str(key)).expanduser().resolve()
        if name != "ckks" or not same:
            raise PermissionError(
                f"lab {lab!r} pins its CKKS key file {key} in its node config; this run would "
                f"use privacy={name} with key {have!r}: refused")


# -- the node-local sample cache -------------------------------------------------------------


def samples_key(cfg: DictConfig) -> str:
    """The hash naming a data config's entry in the node cache: the resolved ``data`` config,
    the cache dir, and the size and time of every file at the top of ``data.root`` (a lab that
    edits its annotation sheet gets a fresh entry)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    stamp: list = []
    root = data.get("root") if isinstance(data, dict) else None
    if root and Path(str(root)).expanduser().is_dir():
        for p in sorted(Path(str(root)).expanduser().iterdir()):
            st = p.stat()
            stamp.append([p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"format": SAMPLES_FORMAT, "data": data, "root": stamp,
                       "cache": str(cfg.paths.cache_dir)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def node_samples(cfg: DictConfig) -> FlowSamples:
    """The lab's samples from the node cache (``<paths.cache_dir>/flower-node/<hash>``:
    ``x.npy`` memory-mapped copy-on-write, ``table.pkl``, ``manifest.json`` written last), or
    loaded with :func:`mer.data.sources.load_samples` and written there for the next message.
    A damaged entry is rebuilt (with a warning naming it)."""
    from mer.data.sources import load_samples

    folder = Path(str(cfg.paths.cache_dir)).expanduser() / "flower-node" / samples_key(cfg)[:24]
    try:
        return read_samples(folder)
    except FileNotFoundError:
        pass
    except (ValueError, OSError, pickle.UnpicklingError, EOFError) as e:
        log.warning("node cache %s is damaged (%s): rebuilding it", folder, e)
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    write_samples(folder, samples)
    return samples


def write_samples(folder: Path, samples: FlowSamples) -> None:
    """Write ``samples`` into the node cache ``folder`` (each file atomically, the manifest
    last: a reader sees a whole entry or none)."""
    from mer.data.io import atomic_write_bytes, atomic_write_json, atomic_write_with

    folder.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(samples.x)
    atomic_write_with(folder / "x.npy", lambda f: np.save(f, x, allow_pickle=False))
    rest = {k: getattr(samples, k) for k in ("meta", "class_names", "excluded", "synthetic",
                                             "provenance", "landmarks", "inputs",
                                             "input_source", "pretrain")}
    table = pickle.dumps(rest, protocol=5)
    atomic_write_bytes(folder / "table.pkl", table)
    atomic_write_json(folder / "manifest.json", {
        "format": SAMPLES_FORMAT, "x_bytes": (folder / "x.npy").stat().st_size,
        "x_shape": list(x.shape), "x_dtype": str(x.dtype),
        "table_sha256": hashlib.sha256(table).hexdigest()})


def read_samples(folder: Path) -> FlowSamples:
    """The samples of a node cache entry; FileNotFoundError when there is none, ValueError
    naming the file when it does not match its manifest."""
    from mer.data.samples import FlowSamples

    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{folder / 'manifest.json'}: format {manifest.get('format')}")
    table = (folder / "table.pkl").read_bytes()
    if hashlib.sha256(table).hexdigest() != manifest["table_sha256"]:
        raise ValueError(f"{folder / 'table.pkl'} does not match its checksum")
    if (folder / "x.npy").stat().st_size != manifest["x_bytes"]:
        raise ValueError(f"{folder / 'x.npy'} has the wrong size")
    x = np.load(folder / "x.npy", mmap_mode="c", allow_pickle=False)
    if list(x.shape) != manifest["x_shape"] or str(x.dtype) != manifest["x_dtype"]:
        raise ValueError(f"{folder / 'x.npy'}: shape {x.shape} {x.dtype}, manifest says "
                         f"{manifest['x_shape']} {manifest['x_dtype']}")
    return FlowSamples(x, **pickle.loads(table))


# -- the node's durable state ------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class NodeStore:
    """A node's ``context.state`` of one run on its disk: ``<state-dir>/run-<id>/<client>.state``
    (written with :func:`mer.data.io.atomic_save`, read with ``checked_load``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, context: Context, client: str) -> NodeStore | None:
        folder = run_dir(context)
        if folder is None:
            return None
        return cls(folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', client)}.state")

    def save(self, state: RecordDict) -> None:
        """Write every record of ``state`` (arrays, configs, metrics), atomically."""
        from mer.data.io import atomic_save

        arrays: dict[str, np.ndarray] = {}
        records = []
        for key, record in state.items():
            if isinstance(record, ArrayRecord):
                items = record.to_numpy_ndarrays()
                arrays.update({f"a{len(records)}_{i}": a for i, a in enumerate(items)})
                records.append({"key": key, "type": "array", "n": len(items)})
            elif isinstance(record, (ConfigRecord, MetricRecord)):
                kind = "config" if isinstance(record, ConfigRecord) else "metric"
                records.append({"key": key, "type": kind,
                                "value": {k: _encode(v) for k, v in record.items()}})
            else:
                raise TypeError(f"node state {key!r}: cannot keep a {type(record).__name__}")
        index = json.dumps({"records": records}).encode()
        arrays["index"] = np.frombuffer(index, np.uint8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(arrays, self.path, kind="npz")

    def restore(self, state: RecordDict) -> None:
        """Fill ``state`` with what :meth:`save` wrote; a damaged file raises
        :class:`~mer.data.io.CorruptFileError` naming it and what to do."""
        from mer.data.io import CorruptFileError, checked_load

        fix = ("delete it to restart this client's state from nothing (its FedBN statistics, "
               "SCAFFOLD control, DP accountant and personalised model of this run are then "
               "lost), or restore it from a backup")
        arrays = checked_load(self.path, kind="npz", what="node state", fix=fix)
        try:
            records = json.loads(bytes(arrays["index"]).decode())["records"]
            for j, r in enumerate(records):
                if r["type"] == "array":
                    state[r["key"]] = ArrayRecord([arrays[f"a{j}_{i}"] for i in range(r["n"])])
                else:
                    value = {k: _decode(v) for k, v in r["value"].items()}
                    state[r["key"]] = (ConfigRecord if r["type"] == "config"
                                       else MetricRecord)(value)
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptFileError(f"node state {self.path} is truncated or corrupt "
                                   f"({type(e).__name__}: {e}); {fix}") from e
