import json

from jaxgpt.cli.main import main


def test_params_json(capsys):
    assert main(["params", "--preset", "gpt2-medium", "--json"]) == 0
    # gpt2-medium unties its head (the book's GPT_CONFIG): every stored parameter is active
    assert json.loads(capsys.readouterr().out) == {"total": 406_212_608, "total_tied": 354_749_440, "active": 406_212_608}


def test_generate_random_model(capsys):
    assert main(["generate", "--prompt", "Hello", "--preset", "test", "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "Hello" and len(out["tokens"]) <= 5 and isinstance(out["text"], str)


def test_bad_preset_is_a_clear_error(capsys):
    assert main(["params", "--preset", "gpt9"]) == 2
    assert "unknown preset 'gpt9'" in capsys.readouterr().err
