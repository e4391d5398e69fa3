"""What ships with alambic: its recipes (run by name) and the demos' configs and data."""

from __future__ import annotations

from importlib import resources, util
from pathlib import Path

from alambic.errors import AlambicError, ConfigError

DEMO_DATASETS = ("digits", "mnist", "fashion-mnist")


DEMO_TASKS = ("classification", "lm")


LM_DEMO_CORPUS = "tinyshakespeare.txt.gz"  # packaged with alambic (recipes/data/), public domain


def demo_config_path(dataset: str) -> Path:
    """The packaged recipe the demo runs for ``dataset``."""
    if dataset not in DEMO_DATASETS:
        raise AlambicError(
            f"the demo runs on {', '.join(DEMO_DATASETS)}, not {dataset!r}; use `alambic run` for others"
        )
    name = "digits.yaml" if dataset == "digits" else f"{dataset}-demo.yaml"
    return Path(str(resources.files("alambic") / "recipes" / name))


def demo_overrides(task: str, dataset: str, data_dir: str | None) -> tuple[Path, list[str]]:
    """The packaged recipe the demo runs for ``task`` (and ``dataset``), and the overrides that point it
    at its data: the language-model demo reads the Tiny Shakespeare corpus that ships with alambic."""
    if task not in DEMO_TASKS:
        raise AlambicError(f"the demo's task is one of {', '.join(DEMO_TASKS)}, not {task!r}")
    if task == "classification":
        return demo_config_path(dataset), [f"data.data_dir={data_dir}"] if data_dir else []
    if dataset != "digits" or data_dir:
        raise AlambicError(
            "--task lm runs on the packaged Tiny Shakespeare; leave out --dataset and --data-dir"
        )
    if not installed("transformers"):  # said before any work, in the demo's words
        raise ConfigError(
            "alambic demo --task lm builds its Llama-style models with Hugging Face transformers, which is not "
            "installed: pip install 'alambic[hf]' (the classification demo, alambic demo, needs no extra)"
        )
    recipes = resources.files("alambic") / "recipes"
    corpus = Path(str(recipes / "data" / LM_DEMO_CORPUS))
    return Path(str(recipes / "lm-demo.yaml")), [f"data.train_file={corpus}"]


def installed(package: str) -> bool:
    """Whether ``package`` can be imported, found without importing it."""
    try:
        return util.find_spec(package) is not None
    except (ImportError, ValueError):  # blocked, or a broken entry in sys.modules
        return False


def packaged_recipes() -> Path:
    """The folder of the recipes that ship with alambic."""
    return Path(str(resources.files("alambic") / "recipes"))


def recipe_path(config: Path) -> Path:
    """``config`` when it is a file, else the packaged recipe of that name (``digits``,
    ``strategies/mutual``); a name that is neither is left to the loader's one-line error."""
    if config.exists() or config.suffix:
        return config
    packaged = packaged_recipes() / f"{config}.yaml"
    return packaged if packaged.is_file() else config


def recipe_purpose(path: Path) -> str:
    """A recipe's one-line purpose: the first line of its header comment after the command."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        if text and not text.startswith("alambic "):
            return text
    return ""
