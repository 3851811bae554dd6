"""The one test-asset locator: FTCORE_TEST_ASSETS, else shared/ in the checkout, else ../shared."""

import pytest
from ftcore.testing import ASSETS_ENV, MissingAssets, asset, assets_dir, stories_model


def test_the_variable_names_the_assets_folder(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path))
    assert assets_dir() == tmp_path.resolve()
    assert asset("data/rows.jsonl") == tmp_path.resolve() / "data" / "rows.jsonl"
    with pytest.raises(MissingAssets, match=r"test asset 'models/stories260K-hf' missing under "):
        stories_model()


def test_a_wrong_variable_fails_clearly_instead_of_falling_back(tmp_path, monkeypatch):
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "nope"))
    with pytest.raises(
        MissingAssets, match=rf"test assets not found \(tried {tmp_path / 'nope'}\)\. Set {ASSETS_ENV}"
    ):
        assets_dir()


def test_the_real_assets_are_found():
    assert (stories_model() / "config.json").is_file()
