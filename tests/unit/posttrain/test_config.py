import pytest

from herd.posttrain.config import DPOConfig, SFTConfig, load_config, parse_overrides


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npath = "m"\n[optim]\nlr = 1e-4\nsteps = 5\n[lora]\nrank = 8\n')
    cfg = load_config(SFTConfig, path, ["--optim.lr", "3e-4", "--lora.targets=wq,wv", "--lora.quantize_base", "true"])
    assert cfg.model.path == "m" and cfg.optim.lr == 3e-4 and cfg.optim.steps == 5
    assert cfg.lora.rank == 8 and cfg.lora.targets == ["wq", "wv"] and cfg.lora.quantize_base is True
    assert load_config(DPOConfig, None).dpo.beta == 0.1 and load_config(DPOConfig, None).dpo.nll_coef == 0.2


@pytest.mark.parametrize("text, needle", [
    ("[optim]\nlrr = 1\n", "unknown key optim.lrr"),
    ("[dpo]\nbeta = 0.1\n", "unknown key dpo"),  # a DPO section is not valid in an SFT config
    ("[optim]\nsteps = 1.5\n", "expected an integer"),
    ("[model]\ndtype = \"int8\"\n", "not one of"),
    ("[optim\n", "not valid TOML"),
])
def test_config_errors_name_the_key(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_config(SFTConfig, path)


def test_override_errors():
    with pytest.raises(ValueError, match="unknown section"):
        load_config(SFTConfig, None, ["--dpo.beta", "1"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config(SFTConfig, None, ["--optim.nope", "1"])
    with pytest.raises(ValueError, match="no value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(FileNotFoundError):
        load_config(SFTConfig, "/nonexistent.toml")
