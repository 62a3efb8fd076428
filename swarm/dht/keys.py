"""DHT key names. Every record a node writes lives under a subkey that carries its signed owner key."""

from __future__ import annotations

import re

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(model: str) -> str:
    """Return the DHT prefix of a model, or raise ValueError if it can't be one."""
    if not _MODEL_NAME_RE.match(model) or model.endswith((".info", ".verdicts")):
        raise ValueError(f"invalid model name for the DHT: {model!r} (letters, digits, '.', '_', '-')")
    return model


def block_key(model: str, block: int) -> str:
    """Key of block `block` of `model`: maps node subkeys to ServerInfo."""
    return f"{check_model_name(model)}.{int(block)}"


def model_info_key(model: str) -> str:
    """Key of the model's metadata (ModelInfo), one subkey per announcing node."""
    return f"{check_model_name(model)}.info"


def verdicts_key(model: str) -> str:
    """Key of the model's refereed verdicts (VerdictRecord), one subkey per referee that published one."""
    return f"{check_model_name(model)}.verdicts"


_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_run_id(run_id: str) -> str:
    """Return a training run id, or raise ValueError (no dots: hivemind's averaging prefixes forbid them)."""
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r} (1 to 64 letters, digits, '_' or '-')")
    return run_id


def stage_key(run_id: str, stage: int) -> str:
    """Key of one training stage: maps its peers' subkeys to StageInfo."""
    return f"{check_run_id(run_id)}.stage{int(stage)}"


def trainers_key(run_id: str) -> str:
    """Key of a run's trainers: maps their subkeys to TrainerInfo."""
    return f"{check_run_id(run_id)}.trainers"


# every node also lists its model here, so tools can find the models a swarm serves
MODELS_KEY = "_swarm.models"


def owner_subkey(peer_id: str, owner_public_key: bytes, tag: str = "") -> bytes:
    """Subkey binding a record to a peer id and to the RSA key that must sign it. A peer keeps one record
    per subkey under a key: a `tag` (letters and digits) lets it keep several, one per tag."""
    if tag and not tag.isalnum():
        raise ValueError(f"a subkey tag is letters and digits, got {tag!r}")
    return peer_id.encode() + (b"/" + tag.encode() if tag else b"") + owner_public_key


def split_owner_subkey(subkey: bytes) -> tuple[str, bytes] | None:
    """Inverse of owner_subkey: (peer_id, "[owner:...]" marker), or None if the subkey is not protected."""
    if not isinstance(subkey, bytes):
        return None
    index = subkey.find(b"[owner:")
    if index <= 0 or not subkey.endswith(b"]"):
        return None
    try:
        peer_id = subkey[:index].decode().split("/", 1)[0]  # without the tag, if any
    except UnicodeDecodeError:
        return None
    return (peer_id, subkey[index:]) if peer_id else None
