"""Writing, checking and publishing QTSplus checkpoint folders that load anywhere with trust_remote_code."""

import ast
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from .pipeline_video_text_to_text import PIPELINE_TASK


# Beyond huggingface_hub's own defaults (.git, .cache/huggingface): byte code a local import may have left behind.
PUSH_IGNORE_PATTERNS = ["__pycache__", "__pycache__/*", "*/__pycache__/*", "*.pyc"]
REQUIRED_AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForImageTextToText")
REQUIRED_CARD_FIELDS = ("library_name", "pipeline_tag", "license", "tags")

logger = logging.getLogger(__name__)


def save_checkpoint(model, processor, directory: str | os.PathLike, max_shard_size: int | str | None = None) -> None:
    """`model.save_pretrained(directory)` and `processor.save_pretrained(directory)`, in one call.

    The folder then serves `AutoModel` / `AutoModelForCausalLM` / `AutoModelForImageTextToText`, `AutoProcessor`
    and `pipeline("video-text-to-text")`, each with `trust_remote_code=True`, without `qtsplus_hf` installed (the
    model's `save_pretrained` writes the pipeline's code and entry). `max_shard_size` (e.g. `"5GB"`) passes to
    `save_pretrained`: larger weights are split into shards plus an index.
    """
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **save_kwargs)
    processor.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------------


def check_output_folder(out_dir: str | os.PathLike) -> str:
    """The absolute path of a new output folder: it may exist only empty, and its parent must exist."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"output folder {out_dir} already exists and is not empty")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise ValueError(f"the parent folder of {out_dir} does not exist")
    return out_dir


def check_base_model(base_model: str | None) -> str | None:
    """The card's `base_model` must be a Hub model id (a local path would publish a dead link); None: unknown."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not base_model:
        return None
    try:
        # "Qwen/Qwen2.5-VL-3B-Instruct" may also be a local download folder: only explicit paths are refused.
        if os.path.isabs(base_model) or base_model.startswith((".", "~")):
            raise HFValidationError("it is a local path")
        validate_repo_id(base_model)
    except HFValidationError as error:
        raise ValueError(f"base model {base_model!r} is not a Hub model id ({error}); pass --base-model") from error
    return base_model


def hub_id_of_local_folder(folder: str | os.PathLike, config: dict | None = None) -> str | None:
    """The Hub model id a local checkpoint folder came from, when it says so: a recorded `qtsplus_base_model`, a
    Hub id in the config's `_name_or_path`, or a huggingface_hub cache snapshot (`.../models--ORG--NAME/snapshots/REV`).
    None when nothing names one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    config = config or {}
    candidates = [config.get("qtsplus_base_model"), config.get("_name_or_path")]
    parts = os.path.abspath(folder).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        candidates.append(parts[-3].removeprefix("models--").replace("--", "/"))
    for candidate in candidates:
        if not isinstance(candidate, str) or os.path.isabs(candidate) or candidate.startswith((".", "~")):
            continue
        try:
            validate_repo_id(candidate)
        except HFValidationError:
            continue
        if "/" in candidate:  # a bare folder name passes the id check but names no Hub repository
            return candidate
    return None


def write_hub_folder(
    model,
    processor,
    out_dir: str | os.PathLike,
    base_model: str | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    max_shard_size: int | str = "5GB",
) -> str:
    """Write a complete Hub repository folder for `model` and `processor`; returns its absolute path.

    Weights (safetensors, sharded above `max_shard_size`), `config.json` with `auto_map` and `custom_pipelines`,
    `generation_config.json`, the processor / tokenizer / chat-template files, every remote-code file at the top level
    and README.md rendered from `hub_card/`. The folder appears complete or not at all (written beside, then renamed).
    `base_model` (a Hub id) defaults to `config.qtsplus_base_model`; when neither names one, the card has no
    `base_model` (logged as a warning: `hub_upload_gaps` reports it).
    """
    from .hub_card import render_model_card

    base_model = check_base_model(base_model or model.config.qtsplus_base_model)
    if base_model is None:
        logger.warning("the base model is unknown: the model card will not name it (pass --base-model ORG/NAME)")
    with staged_output_folder(out_dir) as staging:
        model.config.qtsplus_base_model = base_model
        save_checkpoint(model, processor, staging, max_shard_size=max_shard_size)
        card = render_model_card(model, base_model=base_model, repo_id=repo_id, license=license)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
        validate_hub_folder(staging)
    return os.path.abspath(out_dir)


@contextlib.contextmanager
def staged_output_folder(
    out_dir: str | os.PathLike, publish: Callable[[], bool] | None = None
) -> Iterator[str]:
    """Yield a hidden staging folder beside `out_dir` (checked with `check_output_folder`); on success it becomes
    `out_dir`, on failure it is removed: the output appears complete or not at all. `publish`, asked on success,
    can keep it from becoming the output (under torchrun, every process but the main one)."""
    out_dir = check_output_folder(out_dir)
    staging = tempfile.mkdtemp(prefix=".qtsplus-", dir=os.path.dirname(out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become the output folder's mode
    try:
        yield staging
        if publish is None or publish():
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty, checked above
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# validation (what `qtsplus push --dry-run` checks, offline)
# ----------------------------------------------------------------------------------------------------------------------


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"{name} is missing")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} is not valid JSON: {error}") from error


def _module_syntax_tree(folder: str, module: str, needed_by: str) -> ast.Module:
    path = os.path.join(folder, f"{module}.py")
    if not os.path.isfile(path):
        raise ValueError(f"remote-code file {module}.py (needed by {needed_by}) is missing")
    with open(path, encoding="utf-8") as handle:
        try:
            return ast.parse(handle.read(), filename=path)
        except SyntaxError as error:
            raise ValueError(f"remote-code file {module}.py does not parse: {error}") from error


def _check_remote_reference(folder: str, reference: str, needed_by: str, checked: set[str]) -> None:
    """`module.Class` must name a top-level file that defines the class; its relative imports must resolve too.

    Read as syntax, never imported: validation must not run the folder's code.
    """
    module, _, class_name = reference.rpartition(".")
    if not module or "." in module:
        raise ValueError(f"{needed_by} points at {reference!r}; expected 'module.Class' with the module at the top level")
    tree = _module_syntax_tree(folder, module, needed_by)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    if class_name not in classes:
        raise ValueError(f"{needed_by} points at {reference}, but {module}.py defines no class {class_name}")
    pending = [module]
    while pending:  # the sibling files the loader will copy next to this one
        current = pending.pop()
        if current in checked:
            continue
        checked.add(current)
        for node in ast.walk(_module_syntax_tree(folder, current, needed_by)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                pending += [node.module] if node.module else [alias.name for alias in node.names]


def _check_weights(folder: str) -> None:
    from safetensors import SafetensorError, safe_open

    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json(folder, "model.safetensors.index.json").get("weight_map") or {}
        if not weight_map:
            raise ValueError("model.safetensors.index.json has an empty weight_map")
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise ValueError("no weights: neither model.safetensors nor model.safetensors.index.json")
    stored = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise ValueError(f"weight shard {shard} listed in the index is missing")
        try:
            with safe_open(path, framework="pt") as handle:  # reads and checks the header only
                stored.update(dict.fromkeys(handle.keys(), shard))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"weight file {shard} is not readable safetensors: {error}") from error
    if weight_map is not None:
        misplaced = sorted(name for name, shard in weight_map.items() if stored.get(name) != shard)
        if misplaced:
            raise ValueError(f"the index lists tensors its shards do not hold: {misplaced[:5]}")
    if not any(name.startswith("qtsplus.") for name in stored):
        raise ValueError("the weights hold no QTSplus selector tensors (qtsplus.*)")


def _check_card(folder: str) -> None:
    from huggingface_hub import ModelCard

    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        raise ValueError("README.md (the model card) is missing")
    data = ModelCard.load(path).data.to_dict()
    missing = [field for field in REQUIRED_CARD_FIELDS if not data.get(field)]
    if missing:
        raise ValueError(f"README.md front matter lacks {missing}")
    if data["pipeline_tag"] != PIPELINE_TASK or data["library_name"] != "transformers":
        raise ValueError(f"README.md must declare library_name: transformers and pipeline_tag: {PIPELINE_TASK}")
    if "qtsplus" not in data["tags"]:
        raise ValueError("README.md tags must include qtsplus")


def hub_upload_gaps(folder: str | os.PathLike) -> list[str]:
    """What a valid Hub folder still lacks for a complete Hub page (not needed to load it): today, a card that
    names no `base_model` (the Hub then cannot link the model to the checkpoint it was built from)."""
    from huggingface_hub import ModelCard

    data = ModelCard.load(os.path.join(folder, "README.md")).data.to_dict()
    if data.get("base_model"):
        return []
    return ["README.md names no base_model: re-run `qtsplus export` or `qtsplus convert` with --base-model ORG/NAME"]


def hub_folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of every file `upload_folder` would send, sorted."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = os.path.abspath(folder)
    paths = []
    for root, _, names in os.walk(folder):
        paths += [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/") for name in names]
    kept = filter_repo_objects(sorted(paths), ignore_patterns=DEFAULT_IGNORE_PATTERNS + PUSH_IGNORE_PATTERNS)
    return [(path, os.path.getsize(os.path.join(folder, path))) for path in kept]


def validate_hub_folder(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Check offline that `folder` is a loadable QTSplus Hub repository; returns the files it would upload.

    Checks: config.json's `auto_map` (model classes) and `custom_pipelines`, the processor's `auto_map`, each pointing at
    a top-level remote-code file that defines the class, with every relative import present; readable safetensors
    (headers, index consistency); README.md with the required front matter. Raises ValueError naming the problem.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"model folder not found: {folder}")
    config = _read_json(folder, "config.json")
    auto_map = config.get("auto_map") or {}
    missing = [name for name in REQUIRED_AUTO_CLASSES if name not in auto_map]
    if missing:
        raise ValueError(f"config.json auto_map lacks {missing}")
    checked: set[str] = set()
    for auto_class, references in sorted(auto_map.items()):
        for reference in references if isinstance(references, list) else [references]:  # tokenizers: [slow, fast]
            if reference is not None:
                _check_remote_reference(folder, reference, f"config.json auto_map[{auto_class!r}]", checked)
    pipeline = (config.get("custom_pipelines") or {}).get(PIPELINE_TASK)
    if not pipeline:
        raise ValueError(f"config.json has no custom_pipelines entry for {PIPELINE_TASK!r}")
    _check_remote_reference(folder, pipeline["impl"], f"custom_pipelines[{PIPELINE_TASK!r}]", checked)
    processor_reference = (_read_json(folder, "processor_config.json").get("auto_map") or {}).get("AutoProcessor")
    if not processor_reference:
        raise ValueError("processor_config.json auto_map lacks AutoProcessor")
    _check_remote_reference(folder, processor_reference, "processor_config.json auto_map['AutoProcessor']", checked)
    if not any(os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError("no tokenizer files (tokenizer.json / tokenizer_config.json)")
    _check_weights(folder)
    _check_card(folder)
    return hub_folder_files(folder)


def push_hub_folder(
    folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
    commit_message: str = "Upload QTSplus model",
) -> str:
    """Validate `folder`, then create the repository (and branch) if needed and upload it; returns the commit URL."""
    from huggingface_hub import create_branch, create_repo, upload_folder

    validate_hub_folder(folder)
    create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")  # None: Hub default
    if revision is not None:
        create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS, repo_type="model",
        # Weights re-exported with other sharding must not leave stale shards next to the new ones.
        delete_patterns=["*.safetensors", "*.safetensors.index.json"],
    )
    return commit.commit_url
