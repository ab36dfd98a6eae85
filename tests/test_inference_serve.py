"""`jaxgpt serve`: the real server on a free loopback port, spoken to over HTTP (and by Chromium)."""

import http.client
import json
import shutil
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from jaxgpt.config import get_preset  # noqa: E402
from jaxgpt.inference.generate import generate_batch  # noqa: E402
from jaxgpt.nn.model import init_params  # noqa: E402
from jaxgpt.inference.requests import RequestQueue  # noqa: E402
from jaxgpt.inference.serve import build_app  # noqa: E402
from jaxgpt.data.tokenizer import GPT2Tokenizer  # noqa: E402
from conftest import running_server  # noqa: E402

TOK = GPT2Tokenizer()
CFG = get_preset("test", vocab_size=TOK.vocab_size, context_length=64)
PARAMS = init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def port():
    app = build_app(PARAMS, CFG, TOK, model_name="tiny", max_batch=8, batch_wait_s=0.05, max_tokens_limit=32)
    with running_server(app) as free:
        yield free


def request(port, method, path, body=None, raw=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def complete(port, **body):
    status, text = request(port, "POST", "/v1/completions", body)
    assert status == 200, text
    return json.loads(text)


def greedy_reference(prompt, n):
    ids = TOK.encode(prompt)
    return TOK.decode(generate_batch(PARAMS, CFG, [ids], n, eos_id=TOK.eot_id)[0])


def test_health_models_and_playground_page(port):
    status, text = request(port, "GET", "/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    models = json.loads(request(port, "GET", "/v1/models")[1])
    assert models["data"][0]["id"] == "tiny"
    status, html = request(port, "GET", "/")
    assert status == 200 and "jaxgpt playground" in html and "/v1/completions" in html


def test_completion_matches_the_decoder_and_streaming_matches_too(port):
    body = complete(port, prompt="The cat sat", max_tokens=12, temperature=0)
    assert body["choices"][0]["text"] == greedy_reference("The cat sat", 12)
    assert body["usage"]["completion_tokens"] <= 12 and body["object"] == "text_completion"
    status, stream = request(port, "POST", "/v1/completions",
                             {"prompt": "The cat sat", "max_tokens": 12, "temperature": 0, "stream": True})
    events = [line[6:] for line in stream.split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_string_cuts_the_text(port):
    full = complete(port, prompt="Once upon a time", max_tokens=16, temperature=0)["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = complete(port, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == full[: full.index(stop)]


def test_concurrent_requests_are_batched_and_correct(port):
    before = json.loads(request(port, "GET", "/health")[1])["batches_decoded"]
    prompts = [f"Request number {i} says" for i in range(6)]
    results = [None] * len(prompts)

    tokens = [0] * len(prompts)

    def worker(i):
        body = complete(port, prompt=prompts[i], max_tokens=8, temperature=0)
        results[i], tokens[i] = body["choices"][0]["text"], body["usage"]["completion_tokens"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = json.loads(request(port, "GET", "/health")[1])["batches_decoded"]
    assert after - before < sum(tokens) - len(prompts)  # rows shared decoding steps (the first token comes from prefill)
    for prompt, text in zip(prompts, results):
        assert text == greedy_reference(prompt, 8)


@pytest.mark.parametrize("body, raw, status, message", [
    (None, "{not json", 400, "not valid JSON"),
    ({"prompt": "hi", "colour": "red"}, None, 400, "unknown field 'colour'"),
    ({"prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 33}, None, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, None, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ({"max_tokens": 3}, None, 400, "prompt"),
    ({"prompt": "word " * 80}, None, 400, "context window is 64"),
    ({"prompt": "hi", "model": "gpt-4"}, None, 404, "not served here"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "at most 4"),
    (None, json.dumps({"prompt": "x" * (1 << 20)}), 413, "exceeds the limit"),
])
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(port, body, raw, status, message):
    got, text = request(port, "POST", "/v1/completions", body, raw=raw)
    assert got == status, text
    assert message in json.loads(text)["error"]["message"]
    assert complete(port, prompt="still alive?", max_tokens=2, temperature=0)["choices"][0]["finish_reason"]


def test_client_leaving_mid_stream_frees_its_row(port, monkeypatch):
    # Pace the decoder (50 ms a token) so the 32-token answer is still being decoded when the client
    # leaves: unpaced, this tiny model can finish before the server sees the disconnect.
    take = RequestQueue.take_token
    monkeypatch.setattr(RequestQueue, "take_token", lambda self, *a: (time.sleep(0.05), take(self, *a))[1])
    before = json.loads(request(port, "GET", "/health")[1])["cancelled_rows"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "Tell me a long story", "max_tokens": 32, "temperature": 1.0, "stream": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event arrived: decoding is under way
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 30
    while json.loads(request(port, "GET", "/health")[1])["cancelled_rows"] <= before:
        assert time.time() < deadline, "the abandoned row was never stopped"
        time.sleep(0.1)


def test_playground_in_headless_chromium(port, tmp_path):
    """Type a prompt, set greedy decoding, click Generate, watch the streamed text arrive."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("needs Debian's 'chromium' and 'chromium-driver' packages (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Hello there")
        for field, value in (("max_tokens", "6"), ("temperature", "0")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        completion = driver.find_element(By.ID, "completion").get_attribute("textContent")
        assert completion == greedy_reference("Hello there", 6)
        assert driver.find_element(By.ID, "go").is_enabled()

        # chat mode: two turns, the second sent with the first turn's history
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "mode")).select_by_value("chat")
        messages = []
        for turn, text in enumerate(["Hello", "And then?"]):
            prompt.clear()
            prompt.send_keys(text)
            driver.find_element(By.ID, "go").click()
            WebDriverWait(driver, 60).until(
                lambda d: d.find_element(By.ID, "status").text.startswith("done") and not prompt.get_attribute("value"))
            messages.append({"role": "user", "content": text})
            reply = driver.find_element(By.ID, "reply").get_attribute("textContent")
            assert reply == greedy_chat_reference(messages, 6), turn
            messages.append({"role": "assistant", "content": reply})
        shown = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "#chat-log .message")]
        assert shown == [m["content"] for m in messages]
    finally:
        driver.quit()


@pytest.mark.parametrize("prompt_tokens, asked", [(38, 20), (6, 32)])
def test_the_budget_is_the_context_minus_the_real_prompt(port, prompt_tokens, asked):
    """On a 64-token context, a 38-token prompt asking for 20 tokens got 1 (the padding to 64 was
    counted as prompt); every request now gets what it asks for while prompt + answer fit."""
    prompt = " the" * prompt_tokens  # one GPT-2 token each
    assert len(TOK.encode(prompt)) == prompt_tokens
    body = complete(port, prompt=prompt, max_tokens=asked, temperature=0)
    usage, choice = body["usage"], body["choices"][0]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == asked or choice["finish_reason"] == "stop", body
    assert choice["text"] == greedy_reference(prompt, asked)


# --- chat and metrics ---------------------------------------------------------------------------

from jaxgpt.inference.chat import PLAIN_TEMPLATE_STOP, chat_prompt, plain_prompt  # noqa: E402
from jaxgpt.data.instructions import RESPONSE_MARKER, format_input  # noqa: E402


def greedy_chat_reference(messages, n):
    text = greedy_reference(plain_prompt(messages), n)
    return text.split(PLAIN_TEMPLATE_STOP)[0]


def test_plain_chat_template_is_the_finetuning_prompt():
    """One user message gives exactly the book's instruction prompt; a system message replaces the
    preamble; assistant turns sit after their response marker; a template tokenizer renders its own."""
    assert plain_prompt([{"role": "user", "content": "Name a colour."}]) == \
        format_input({"instruction": "Name a colour.", "input": ""}) + RESPONSE_MARKER
    two = plain_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert two == "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.\n\n### Instruction:\nBye\n\n### Response:\n"

    class Templated:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    assert chat_prompt(Templated(), [{"role": "user", "content": "x"}]) == ("<user>x<assistant>", [])


def test_chat_completion_json_and_stream_agree_with_the_decoder(port):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    status, text = request(port, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8,
                                                                    "temperature": 0})
    assert status == 200, text
    body = json.loads(text)
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == greedy_chat_reference(messages, 8)
    status, stream = request(port, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8,
                                                                      "temperature": 0, "stream": True})
    events = [line[6:] for line in stream.split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "must be the user's"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, "system message may only come first"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "unknown field 'messages.0.name'"),
    ({"messages": [{"role": "user", "content": "word " * 80}]}, "context window is 64"),
])
def test_bad_chat_requests_get_400(port, body, message):
    got, text = request(port, "POST", "/v1/chat/completions", body)
    assert got == 400 and message in json.loads(text)["error"]["message"], text


def test_metrics_endpoint_counts_in_prometheus_format(port):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        status, text = request(port, "GET", "/metrics")
        assert status == 200
        return {s.name + json.dumps(s.labels, sort_keys=True): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    before = scrape()
    complete(port, prompt="count me", max_tokens=5, temperature=0)
    request(port, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0})  # a 400
    after = scrape()
    ok, bad = 'jaxgpt_requests_total{"status": "200"}', 'jaxgpt_requests_total{"status": "400"}'
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    assert after["jaxgpt_generated_tokens_total{}"] - before["jaxgpt_generated_tokens_total{}"] == 5
    assert after["jaxgpt_time_to_first_token_seconds_count{}"] == before["jaxgpt_time_to_first_token_seconds_count{}"] + 1
    assert after["jaxgpt_time_per_output_token_seconds_count{}"] - \
        before["jaxgpt_time_per_output_token_seconds_count{}"] == 4
    for name in ("jaxgpt_queue_length{}", "jaxgpt_running_rows{}", "jaxgpt_generated_tokens_per_second{}"):
        assert name in after
    assert after["jaxgpt_generated_tokens_per_second{}"] > 0


def _hf_tokenizer(template):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxgpt.data.tokenizer import HFTokenizer

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "<eos>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(tok.to_str(), eos=2, chat_template=template)


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", r"cannot be rendered \(line 1\): TemplateSyntaxError"),
    ("{{ messages.append(1) }}", "cannot be rendered: SecurityError"),  # the sandbox refuses mutation
    ("{{ raise_exception('only user turns') }}", "chat template: only user turns"),
])
def test_a_broken_chat_template_is_named_not_a_traceback(template, message):
    from jaxgpt.inference.chat import ChatError, chat_prompt

    with pytest.raises(ChatError, match=message):
        chat_prompt(_hf_tokenizer(template), [{"role": "user", "content": "hi"}])


def test_a_model_without_a_tokenizer_takes_token_ids_and_says_why_chat_cannot_work():
    from jaxgpt.data.tokenizer import IdsTokenizer

    cfg = get_preset("test", vocab_size=64, context_length=32)
    app = build_app(init_params(cfg, seed=0), cfg, IdsTokenizer(64, eos=1), model_name="ids", max_tokens_limit=8,
                    warmup=False)
    with running_server(app) as p:
        status, text = request(p, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 501 and "served model has no tokenizer" in json.loads(text)["error"]["message"], text
        status, text = request(p, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert status == 400 and "must be a list of token ids, not text" in text, text
        status, text = request(p, "POST", "/v1/completions", {"prompt": [5, 9, 3], "max_tokens": 3, "temperature": 0})
        assert status == 200, text
        want = generate_batch(init_params(cfg, seed=0), cfg, [[5, 9, 3]], 3, eos_id=1)[0]
        assert json.loads(text)["choices"][0]["text"] == "".join(f"<{t}>" for t in want)
        status, text = request(p, "POST", "/v1/completions", {"prompt": [5, 999], "max_tokens": 3})
        assert status == 400 and "outside the model's vocabulary" in text, text
