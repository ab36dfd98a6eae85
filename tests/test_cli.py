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


def test_library_errors_go_to_a_file_and_one_line_says_where(capsys):
    """What Orbax and asyncio log from background threads (hundreds of lines on a full disk) is kept
    in a file while a command runs; stderr gets one line; the hooks are put back afterwards."""
    import logging
    import sys
    import threading

    from jaxgpt.cli.library_logs import library_logs_to_file

    hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
    with library_logs_to_file("test") as path:
        logging.getLogger("absl").error("could not write a shard")
        worker = threading.Thread(target=lambda: 1 / 0)
        worker.start()
        worker.join()
    err = capsys.readouterr().err
    assert err.strip() == f"[jaxgpt] 2 warning/error message(s) from libraries (Orbax, asyncio) are in {path}"
    text = path.read_text()
    assert "could not write a shard" in text and "ZeroDivisionError" in text
    assert (threading.excepthook, sys.excepthook, sys.unraisablehook) == hooks
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("absl").handlers)
    path.unlink()
