"""`qtsplus export`, `qtsplus push` and `qtsplus convert`: Hub folders from QTSplus, stock or released checkpoints."""

import argparse
import logging
import os


def stock_sources() -> dict[str, str]:
    """`--from` of a stock backbone (its stock config's model_type, a key of `qtsplus_hf.BACKBONES`) -> its name."""
    from . import BACKBONES

    return {name: model_class.backbone_name for name, (_, model_class, _) in BACKBONES.items()}


def _human_size(size: int) -> str:
    scaled, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, larger
    return f"{size} B" if unit == "B" else f"{scaled:.1f} {unit}"


def _print_files(files: list[tuple[str, int]]) -> None:
    for path, size in files:
        print(f"  {_human_size(size):>10}  {path}")
    print(f"  {_human_size(sum(size for _, size in files)):>10}  total, {len(files)} files")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="new Hub folder to write (must not exist or be empty)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the source checkpoint for the card's base_model (default: recorded in config)")
    parser.add_argument("--repo-id", default=None, help="Hub id the card's usage snippets name")
    parser.add_argument("--license", default="apache-2.0", help="license in the card's metadata (default apache-2.0)")
    parser.add_argument("--max-shard-size", default="5GB", help="split the weights above this size (default 5GB)")


def _check_output_options(args: argparse.Namespace, base_model: str | None) -> None:
    """Fail on a bad --out or base model before any weights are read; `args.base_model` becomes the base model
    found (None: unknown, the card will not name one)."""
    from .hub import check_base_model, check_output_folder

    args.base_model = check_base_model(base_model)
    check_output_folder(args.out)


def _write(model, processor, args: argparse.Namespace) -> None:
    from .hub import hub_folder_files, write_hub_folder

    out = write_hub_folder(model, processor, args.out, base_model=args.base_model, repo_id=args.repo_id,
                           license=args.license, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    _print_files(hub_folder_files(out))


def qtsplus_classes() -> dict[str, tuple[type, type]]:
    """QTSplus config model_type -> (model class, processor class), one per backbone of `qtsplus_hf.BACKBONES`."""
    from . import BACKBONES

    return {config_class.model_type: (model_class, processor_class)
            for config_class, model_class, processor_class in BACKBONES.values()}


def run_export(args: argparse.Namespace) -> None:
    """A saved QTSplus checkpoint folder (any backbone: the classes follow its config's model_type) -> a complete
    Hub folder."""
    import json

    config_path = os.path.join(args.model, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in {args.model}")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    classes = qtsplus_classes()
    if config.get("model_type") not in classes:
        choices = " / ".join(f"--from {name}" for name in (*stock_sources(), "official"))
        raise ValueError(f"{args.model} is not a QTSplus checkpoint (model_type {config.get('model_type')!r}); "
                         f"use `qtsplus convert` ({choices})")
    _check_output_options(args, args.base_model or config.get("qtsplus_base_model"))
    from .convert import load_processor

    model_class, processor_class = classes[config["model_type"]]
    processor = load_processor(args.model, processor_class)
    model = model_class.from_pretrained(args.model)
    _write(model, processor, args)


def _http_client_error() -> type[Exception]:
    """The base error of the HTTP client huggingface_hub uses: httpx for hub 1.x, its successor httpx2 for 2.x.
    Connection failures raise it directly, not as an `OSError`."""
    try:
        from httpx import HTTPError
    except ImportError:
        from httpx2 import HTTPError
    return HTTPError


def run_push(args: argparse.Namespace) -> None:
    """Validate a Hub folder, then (unless --dry-run) create the repository and upload it."""
    from huggingface_hub.utils import validate_repo_id

    from .hub import hub_upload_gaps, push_hub_folder, validate_hub_folder

    validate_repo_id(args.repo_id)
    files = validate_hub_folder(args.model)
    visibility = "private if new" if args.private else "the Hub's default visibility if new"
    target = f"{args.repo_id} ({visibility}, revision {args.revision or 'main'})"
    gaps = hub_upload_gaps(args.model)
    if args.dry_run:
        print(f"dry run: {args.model} is valid; would upload to {target}:")
        _print_files(files)
        for gap in gaps:
            print(f"still lacks: {gap}")
        return
    for gap in gaps:
        logging.getLogger(__name__).warning("uploading anyway, but the repository lacks this: %s", gap)
    print(f"uploading {len(files)} files to {target}")
    try:
        url = push_hub_folder(args.model, args.repo_id, private=args.private, revision=args.revision)
    except (OSError, _http_client_error()) as error:  # HTTP, connection, offline: the first line says what happened
        raise OSError(str(error).strip().splitlines()[0]) from error
    print(f"pushed: {url}")


def _qtsplus_overrides(args: argparse.Namespace) -> dict:
    names = {
        "max_tokens": "qtsplus_max_tokens", "rho_min": "qtsplus_rho_min", "rho_max": "qtsplus_rho_max",
        "scoring_layers": "qtsplus_num_scoring_layers", "reencode_layers": "qtsplus_num_reencode_layers",
        "position_mode": "qtsplus_position_mode",
    }
    overrides = {field: getattr(args, name) for name, field in names.items() if getattr(args, name) is not None}
    if args.base_model:
        overrides["qtsplus_base_model"] = args.base_model
    return overrides


def check_stock_source(source: str, source_format: str, config: dict | None) -> None:
    """A stock `--from` source must be that backbone's checkpoint: its config.json (`config`, read from the Hub when
    None) must have the model_type `source_format` (`qwen2_5_vl`, `qwen3_vl`). ValueError (one line) otherwise."""
    if config is None:
        from transformers import PretrainedConfig

        try:
            config, _ = PretrainedConfig.get_config_dict(source)
        except (OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"cannot read the config of {source}: {first_line}") from error
    model_type = config.get("model_type")
    if model_type == source_format:
        return
    expected = f"not a stock {stock_sources()[source_format]} checkpoint (model_type {source_format!r})"
    if model_type in qtsplus_classes():
        hint = "it is a QTSplus checkpoint already: use `qtsplus export`"
    elif model_type in stock_sources():
        hint = f"use --from {model_type}"
    else:
        hint = f"--from takes {', '.join(stock_sources())} or official"
    raise ValueError(f"{source} has model_type {model_type!r}, {expected}; {hint}")


def run_convert(args: argparse.Namespace) -> None:
    """A stock Qwen2.5-VL, a stock Qwen3-VL or a released QTSplus checkpoint -> a QTSplus Hub folder."""
    from .convert import from_official_checkpoint, load_processor

    overrides = _qtsplus_overrides(args)
    processor_source = args.processor or args.source
    is_local = os.path.isdir(args.source)
    if args.source_format == "official" and not is_local:
        raise ValueError(f"checkpoint folder not found: {args.source} (--from official reads a local folder)")
    # A Hub id names its own base model; a local folder may record one (or be a Hub cache snapshot).
    recorded = source_config = None
    if is_local:
        from .convert import load_config_dict
        from .hub import hub_id_of_local_folder

        source_config = load_config_dict(args.source)
        recorded = hub_id_of_local_folder(args.source, source_config)
    _check_output_options(args, args.base_model or (recorded if is_local else args.source))
    if args.source_format == "official":
        for flag, value in (("--scoring-layers", args.scoring_layers), ("--reencode-layers", args.reencode_layers),
                            ("--position-mode", args.position_mode), ("--recipe", args.recipe),
                            ("--init", args.init_scheme)):
            if value is not None:
                raise ValueError(f"{flag} does not apply to --from official: the released weights fix it")
    elif args.base_config is not None:
        raise ValueError("--base-config applies to --from official only")
    else:  # before the processor and the weights: a checkpoint of another backbone fails in one line
        check_stock_source(args.source, args.source_format, source_config)
    from . import BACKBONES

    backbone = "qwen2_5_vl" if args.source_format == "official" else args.source_format
    config_class, model_class, processor_class = BACKBONES[backbone]
    modes = config_class.supported_position_modes
    if args.position_mode is not None and args.position_mode not in modes:  # the config would refuse it after loading
        raise ValueError(f"--position-mode {args.position_mode} does not apply to --from {args.source_format} "
                         f"(supported: {', '.join(modes)})")
    # before the weights: bad processor files fail in seconds
    processor = load_processor(processor_source, processor_class)
    if backbone == "qwen3_vl":
        from transformers import Qwen3VLVideoProcessor

        if not isinstance(processor.video_processor, Qwen3VLVideoProcessor):
            raise ValueError(f"the processor files in {processor_source} are not Qwen3-VL's (video processor "
                             f"{type(processor.video_processor).__name__}, not Qwen3VLVideoProcessor)")
    overrides.update(processor.chat_turn_settings())  # where the model finds the question without a query mask
    if args.source_format == "official":
        model = from_official_checkpoint(args.source, base_config=args.base_config, **overrides)
    else:
        model = model_class.from_stock(args.source, recipe=args.recipe, init_scheme=args.init_scheme, **overrides)
    _write(model, processor, args)


def add_hub_commands(commands) -> None:
    """Register `export`, `push` and `convert` on the `qtsplus` sub-command parsers."""
    from .cli import keep_ratio, positive_int
    from .configuration_qtsplus import RECIPES
    from .selector_qtsplus import INIT_SCHEMES

    export = commands.add_parser("export", help="write a complete Hub folder from a saved QTSplus checkpoint")
    export.add_argument("--model", required=True, help="QTSplus checkpoint folder (weights, config, processor)")
    _add_output_options(export)
    export.set_defaults(handler=run_export)

    push = commands.add_parser("push", help="upload a Hub folder (validated first; --dry-run checks offline)")
    push.add_argument("--model", required=True, help="Hub folder written by `qtsplus export` or `qtsplus convert`")
    push.add_argument("--repo-id", required=True, help="target repository, e.g. user/qtsplus-qwen2.5-vl-3b")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    push.add_argument("--dry-run", action="store_true", help="validate and list the files; no network")
    push.set_defaults(handler=run_push)

    convert = commands.add_parser("convert", help="convert a Qwen2.5-VL, a Qwen3-VL or a released QTSplus checkpoint")
    convert.add_argument("--from", dest="source_format", required=True, choices=(*stock_sources(), "official"),
                         help="qwen2_5_vl: a stock Qwen2.5-VL; qwen3_vl: a stock Qwen3-VL (dense); official: the "
                              "paper's released QTSplus checkpoints (Qwen2.5-VL)")
    convert.add_argument("source", help="checkpoint folder (a Hub id also works with --from qwen2_5_vl / qwen3_vl)")
    convert.add_argument("--processor", default=None, help="folder with the processor files (default: SOURCE)")
    convert.add_argument("--base-config", default=None,
                         help="official only: stock Qwen2.5-VL config.json (or folder) for the vision settings")
    convert.add_argument("--max-tokens", type=positive_int, default=None, help="n_max, the most tokens kept")
    convert.add_argument("--rho-min", type=keep_ratio, default=None)
    convert.add_argument("--rho-max", type=keep_ratio, default=None)
    convert.add_argument("--scoring-layers", type=positive_int, default=None)
    convert.add_argument("--reencode-layers", type=int, default=None)
    convert.add_argument("--position-mode", choices=("mrope", "sequential"), default=None)
    convert.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                         help="released: the released QTSplus-3B training settings (tau 0.5, lambdas 0.1 / 0.17 / "
                              "0.05, n_max 512, 2 re-encode layers) and its initialisation; the options above win")
    convert.add_argument("--init", dest="init_scheme", choices=INIT_SCHEMES, default=None,
                         help="identity (default): the converted model equals the stock one at keep ratio 1.0; "
                              "released: the released code's scheme (scoring from the last LM layer, o_proj kept)")
    _add_output_options(convert)
    convert.set_defaults(handler=run_convert)
