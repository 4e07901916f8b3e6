"""`nemotron-jax serve` end to end: the real uvicorn server on tiny-hetero, driven by the official
`openai` client. Independent references: `Model.generate` (its own engine) for greedy tokens and
log-probs, the tokenizer's own chat template for the prompts. Plus the pieces with subtle edge
cases (stop strings, the `<think>` split while streaming) tested directly."""

import asyncio
import concurrent.futures
import random
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

import nemotron_jax as nj
from nemotron_jax.cli.serve_commands import build_app
from nemotron_jax.engine import SamplingOptions, TokenEvent
from nemotron_jax.serve.chat import chat_prompt
from nemotron_jax.serve.protocol import ChatCompletionRequest
from nemotron_jax.serve.runner import EngineFailure, EngineRequest, EngineRunner
from nemotron_jax.serve.text import Detokenizer, ReasoningSplitter, split_reasoning

uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny-hetero"
ENGINE = {"max_batch": 4, "page_size": 16, "num_pages": 48}  # model.generate below uses the same shapes
USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="session")
def server(tiny_hetero):
    tok = nj.Tokenizer.tiny()
    app = build_app(tiny_hetero, tok, NAME, default_max_tokens=16, **ENGINE)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
    yield SimpleNamespace(base=base, client=client, app=app, engine=app.state.engine, tok=tok, model=tiny_hetero,
                          stop=app.state.config.stop_ids)
    srv.should_exit = True
    thread.join(30)


def _stats(server) -> dict:
    return httpx.get(f"{server.base}/stats").json()


def _reference(server, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and log-probs from `Model.generate` (a separate engine), stop token included."""
    toks, lps = server.model.generate([prompt_ids], max_tokens, stop_tokens=list(server.stop), return_logprobs=True,
                                      decode_steps=4, **ENGINE)
    return toks[0], lps[0]


def _wait_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        stats = _stats(server)
        idle = stats["running"] == 0 and stats["free_pages"] == server.engine.num_pages - 1
        if idle or time.time() > deadline:
            return stats
        time.sleep(0.05)


def _text(server, tokens: list[int]) -> str:
    return server.tok.decode([t for t in tokens if t not in server.stop], skip_special_tokens=True)


def _chat(server, **kw):
    kw.setdefault("model", NAME)
    kw.setdefault("messages", USER)
    return server.client.chat.completions.create(**kw)


# ---------------------------------------------------------------- the pieces
def test_split_reasoning_and_its_streaming_form_agree():
    assert split_reasoning("<think>\nAdd them.\n</think>\n\n5") == ("Add them.", "5")
    assert split_reasoning("5, no thought") == (None, "5, no thought")
    assert split_reasoning("<think>cut off by max_tokens") == ("cut off by max_tokens", "")
    rng = random.Random(0)
    for text in ["<think>\na</th b\n</think>  c d ", " <think></think>x", "<thi", "plain <think> later", ""]:
        for _ in range(20):
            splitter, r, c, i = ReasoningSplitter(), "", "", 0
            while i < len(text):
                j = i + rng.randint(1, 3)
                dr, dc = splitter.push(text[i:j])
                r, c, i = r + dr, c + dc, j
            dr, dc = splitter.flush()
            assert (r + dr if splitter.has_reasoning else None, c + dc) == split_reasoning(text), text


def test_detokenizer_cuts_at_a_stop_string_across_tokens_and_holds_back_partial_matches():
    tok = nj.Tokenizer.tiny()
    text = "The answer is 5. Done here."
    ids = tok.encode(text)
    detok, out = Detokenizer(tok, tok.eos_ids, ["Done"]), ""
    for t in ids:
        out += detok.push([t])
        assert "The answer is 5. ".startswith(out)  # "D", "Do", "Don" are held back, never released
    assert detok.stopped and out + detok.flush() == "The answer is 5. "
    detok = Detokenizer(tok, tok.eos_ids, ["zzz"])
    assert detok.push([*ids, tok.eos_ids[0]]) + detok.flush() == text and not detok.stopped


class _FlakyEngine:
    """Engine stand-in: one token per request per step; `step` raises while `broken`."""

    def __init__(self):
        self.live, self.broken, self.stats, self.num_pages, self.free_pages = {}, True, {}, 8, 7

    def add_request(self, prompt, options, request_id, group=None):
        if not prompt:
            raise ValueError("prompt must be a non-empty list")
        self.live[request_id] = options.max_new_tokens
        return request_id

    def has_work(self):
        return bool(self.live)

    def abort(self, rid):
        self.live.pop(rid, None)

    def step(self):
        if self.broken:
            raise RuntimeError("device fell over")
        events = []
        for rid in list(self.live):
            self.live[rid] -= 1
            events.append(TokenEvent(rid, 5, -1.0, self.live[rid] == 0, "length" if self.live[rid] == 0 else None))
            if self.live[rid] == 0:
                del self.live[rid]
        return events


def test_runner_survives_bad_requests_and_failing_steps():
    engine = _FlakyEngine()
    runner = EngineRunner(engine)
    runner.start()

    async def scenario():
        with pytest.raises(ValueError, match="non-empty"):
            await runner.submit([EngineRequest("bad", [], SamplingOptions(2))])
        events = await runner.submit([EngineRequest("a", [1], SamplingOptions(2))])
        assert isinstance(await events.get(), EngineFailure)
        engine.broken = False
        events = await runner.submit([EngineRequest("b", [1], SamplingOptions(2))])
        got = [e for _ in range(2) for e in await events.get()]
        assert [(e.request_id, e.finished) for e in got] == [("b", False), ("b", True)]

    try:
        asyncio.run(scenario())
        assert runner.alive and runner.stats["failures"] == 1
    finally:
        runner.stop()


def test_chat_prompt_is_the_template_with_the_toggle(server):
    tok = server.tok
    for thinking in (True, False, None):
        req = ChatCompletionRequest(model=NAME, messages=USER, thinking=thinking)
        assert chat_prompt(req, tok) == (tok.apply_chat_template(USER, thinking=thinking), thinking)
    system = [{"role": "system", "content": "detailed thinking on"}, *USER]
    assert chat_prompt(ChatCompletionRequest(model=NAME, messages=system), tok) == (
        tok.apply_chat_template(USER, thinking=True), True)


# ---------------------------------------------------------------- the server
def test_models_health_and_unknown_routes(server):
    assert [m.id for m in server.client.models.list()] == [NAME]
    assert server.client.models.retrieve(NAME).id == NAME
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    r = httpx.get(f"{server.base}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_greedy_chat_equals_model_generate_with_logprobs(server):
    ids = server.tok.apply_chat_template(USER, thinking=False)
    tokens, logprobs = _reference(server, ids, 8)
    r = _chat(server, max_tokens=8, logprobs=True, extra_body={"thinking": False})
    choice = r.choices[0]
    reasoning, content = split_reasoning(_text(server, tokens))
    assert (choice.message.content, getattr(choice.message, "reasoning_content", None)) == (content, reasoning)
    assert choice.finish_reason == ("stop" if tokens[-1] in server.stop else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    kept = [(t, lp) for t, lp in zip(tokens, logprobs, strict=True) if t not in server.stop]
    got = choice.logprobs.content
    assert [x.token for x in got] == [server.tok.decode([t]) for t, _ in kept]
    assert [x.logprob for x in got] == pytest.approx([lp for _, lp in kept], abs=1e-4)
    assert all(x.top_logprobs == [] for x in got)


def test_streaming_chat_concatenates_to_the_non_streaming_message(server):
    kw = {"max_tokens": 8, "extra_body": {"thinking": False}}
    whole = _chat(server, **kw).choices[0]
    chunks = list(_chat(server, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == whole.message.content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (
        getattr(whole.message, "reasoning_content", None) or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == _chat(server, **kw).usage


def test_completions_from_token_ids_and_text(server):
    ids = [1, 17, 40, 41, 42, 300]
    tokens, _ = _reference(server, ids, 6)
    r = server.client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    assert r.choices[0].text == _text(server, tokens)
    assert len(r.choices[0].logprobs.token_logprobs) == len([t for t in tokens if t not in server.stop])
    assert r.usage.prompt_tokens == len(ids)
    streamed = server.client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    r = server.client.completions.create(model=NAME, prompt=["Hello", "Bye now"], max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(len(server.tok.encode(p, add_bos=True)) for p in ["Hello", "Bye now"])


def test_thinking_toggle_writes_the_system_prompt(server):
    for thinking in (True, False):
        r = _chat(server, max_tokens=1, extra_body={"thinking": thinking})
        assert r.usage.prompt_tokens == len(server.tok.apply_chat_template(USER, thinking=thinking))
    r = _chat(server, max_tokens=1)
    assert r.usage.prompt_tokens == len(server.tok.apply_chat_template(USER))
    with pytest.raises(openai.BadRequestError, match="either"):
        _chat(server, messages=[{"role": "system", "content": "be brief"}, *USER], extra_body={"thinking": True})


def test_n_choices_share_the_prompt_and_a_seed_reproduces_them(server):
    ids = server.tok.apply_chat_template(USER, thinking=True)
    before = _stats(server)["engine"]["prefill_tokens"]
    kw = {"n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 7, "extra_body": {"thinking": True}}
    first = _chat(server, **kw)
    prefilled = _stats(server)["engine"]["prefill_tokens"] - before
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert prefilled < 3 * (len(ids) - 1), "the prompt was prefilled once and its full pages shared"
    texts = [(c.message.content, getattr(c.message, "reasoning_content", None)) for c in first.choices]
    assert [(c.message.content, getattr(c.message, "reasoning_content", None))
            for c in _chat(server, **kw).choices] == texts
    other = _chat(server, **{**kw, "seed": 8})
    assert [(c.message.content, getattr(c.message, "reasoning_content", None)) for c in other.choices] != texts


def test_stop_string_truncates_and_ends_the_choice(server):
    ids = [1, 17, 40, 41, 42, 300]
    full = server.client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
    if len(full) < 6:
        pytest.skip(f"the random model's text is too short to cut: {full!r}")
    stop = full[3:5]
    r = server.client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:full.index(stop)], "stop")
    assert _wait_idle(server)["free_pages"] == server.engine.num_pages - 1


def test_concurrent_requests_are_batched(server):
    before = _stats(server)
    kw = {"max_tokens": 12, "temperature": 0, "extra_body": {"thinking": False, "ignore_eos": True}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _chat(server, **kw), range(4)))
    after = _stats(server)
    assert len({r.choices[0].message.content for r in results}) == 1  # greedy: batching changes nothing
    shared = sum(v for k, v in after["batch_sizes"].items() if int(k) > 1) - sum(
        v for k, v in before["batch_sizes"].items() if int(k) > 1)
    decodes = after["engine"]["decode_calls"] - before["engine"]["decode_calls"]
    assert shared > 0, "no engine step served more than one request"
    assert decodes < 4 * 12 // 4, f"{decodes} decode calls: as many as one request at a time would need"


def test_a_disconnected_stream_is_aborted_and_frees_its_pages(server):
    aborted = _stats(server)["aborted"]
    stream = _chat(server, stream=True, max_tokens=500, extra_body={"thinking": False, "ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert _stats(server)["running"] == 1
    stream.close()
    stats = _wait_idle(server)
    assert stats["free_pages"] == server.engine.num_pages - 1 and stats["running"] == 0
    assert stats["aborted"] == aborted + 1


def test_a_client_that_stops_waiting_for_a_whole_response_is_aborted_too(server):
    aborted = _stats(server)["aborted"]
    body = {"model": NAME, "messages": USER, "max_tokens": 500, "thinking": False, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=1.0))
    stats = _wait_idle(server)
    assert stats["free_pages"] == server.engine.num_pages - 1 and stats["aborted"] == aborted + 1


def test_cli_refuses_bad_arguments_before_loading_weights(capsys):
    from nemotron_jax.cli import main

    assert main(["serve", NAME, "--port", "70000"]) == 2
    assert main(["serve", "no/such/model"]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_bad_requests_get_openai_errors_and_the_engine_keeps_serving(server):
    with pytest.raises(openai.NotFoundError):
        _chat(server, model="no-such-model", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, max_tokens=4000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"n": 0}, {"max_tokens": 0},
                {"top_logprobs": 3, "logprobs": True}, {"presence_penalty": 1.0}):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(server, **{"max_tokens": 2, **bad})
        assert e.value.param == next(iter(bad)), bad
    with pytest.raises(openai.BadRequestError, match="pages"):  # fits the context, not the page pool
        _chat(server, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="token ids"):  # refused by engine.add_request itself
        server.client.completions.create(model=NAME, prompt=[1, 10 ** 6], max_tokens=2)
    r = httpx.post(f"{server.base}/v1/chat/completions", json={"model": NAME, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _chat(server, max_tokens=2).choices[0].finish_reason in ("length", "stop")
    assert httpx.get(f"{server.base}/health").status_code == 200
