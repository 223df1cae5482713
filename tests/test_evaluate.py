"""vlmtune.evaluate: CLI with progress bar and provenance, both engines' fields, errors that
name the culprit. LMDeploy's GPU pipeline is the one double here (no GPU on these machines); its
template, generation and engine configs are LMDeploy's own classes."""

import json
import sys

import pytest

from conftest import PREDICTION_FIELDS as FIELDS
from vlmtune import evaluate
from vlmtune.prompt import SYSTEM_PROMPT

GEN = dict(max_new_tokens=4, do_sample=False, temperature=1.0, top_p=1.0, seed=0)


@pytest.fixture()
def eval_file(tmp_path):
    recs = [
        dict(
            id="e0",
            image="images/demo000.jpg",
            type="I2T",
            question="请你根据这张图片,讲一个脑洞大开的梗。",
            references=[dict(text="小猫咪,你的猫爪好臭啊", star=197)],
        ),
        dict(
            id="e1",
            image="images/demo006.jpg",
            type="T2T",
            question="给这张图配一句话。",
            references=[dict(text="我的快乐,来得快去得也快。", star=None)],
        ),
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def test_cli_generate_shows_progress_and_writes_predictions_and_provenance(
    tiny_model, demo_dataset, eval_file, tmp_path, capsys
):
    out = tmp_path / "base" / "predictions.jsonl"
    evaluate.main(
        [
            "generate",
            "--model",
            str(tiny_model),
            "--eval",
            str(eval_file),
            "--image-folder",
            str(demo_dataset),
            "--engine",
            "transformers",
            "--generation",
            json.dumps(GEN),
            "--batch-size",
            "2",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert "generate (transformers)" in err and "2/2" in err
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["e0", "e1"] and set(rows[0]) == FIELDS
    assert all(r["completion_tokens"] <= 4 and r["engine"] == "transformers" for r in rows)
    prov = json.loads((out.parent / "provenance.json").read_text(encoding="utf-8"))
    assert prov["records"] == 2 and prov["engine"] == "transformers"


def test_missing_image_is_named(tiny_model, tmp_path):
    (tmp_path / "eval.jsonl").write_text(
        json.dumps(dict(id="a", image="images/gone.jpg", question="q", references=[])) + "\n"
    )
    with pytest.raises(SystemExit, match=r"image .*images/gone\.jpg does not exist"):
        evaluate.main(
            [
                "generate",
                "--model",
                str(tiny_model),
                "--eval",
                str(tmp_path / "eval.jsonl"),
                "--image-folder",
                str(tmp_path),
                "--engine",
                "transformers",
                "--generation",
                json.dumps(GEN),
                "--out",
                str(tmp_path / "p.jsonl"),
            ]
        )
    assert not (tmp_path / "p.jsonl").exists()


def test_missing_engine_names_the_env_to_use(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lmdeploy", None)  # import lmdeploy -> ImportError
    (tmp_path / "eval.jsonl").write_text("")
    with pytest.raises(
        evaluate.EvaluateError, match=r"'lmdeploy'.*envs/lmdeploy\.yaml.*evaluate\.engine: transformers"
    ):
        evaluate.generate(
            tmp_path, tmp_path / "eval.jsonl", tmp_path, "lmdeploy", tmp_path / "p.jsonl", GEN, 2, 4096
        )


def test_bad_inputs_are_named(tmp_path, eval_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "a", "image": "x.jpg", "question": "q", "references": []}\n{oops\n', encoding="utf-8"
    )
    with pytest.raises(evaluate.EvaluateError, match=rf"{bad}:2: malformed_json"):
        evaluate.read_eval(bad)
    bad.write_text('{"id": "a", "image": "x.jpg"}\n', encoding="utf-8")
    with pytest.raises(evaluate.EvaluateError, match=rf"{bad}:1: record lacks question, references"):
        evaluate.read_eval(bad)
    # The one JSONL reader: a BOM is no record, a raw U+2028 inside a text splits nothing,
    # a non-UTF-8 line is named.
    good = '{"id": "a", "image": "x.jpg", "question": "q\u2028?", "references": []}'
    bad.write_bytes(b"\xef\xbb\xbf" + good.replace("\\u2028", "\u2028").encode() + b"\n")
    assert [r["question"] for r in evaluate.read_eval(bad)] == ["q\u2028?"]
    bad.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(evaluate.EvaluateError, match=rf"{bad}:2: not_utf8"):
        evaluate.read_eval(bad)
    with pytest.raises(evaluate.EvaluateError, match="--generation lacks top_p, seed"):
        evaluate.check_generation(dict(max_new_tokens=1, do_sample=False, temperature=1.0))


class FakeImageEncoder:
    """LMDeploy's image encoder as its request path uses it: InternVL's own preprocessing, run on
    the encoder's single worker thread (``preprocess`` is what LMDeployEngine may re-route)."""

    def __init__(self, model_path):
        from concurrent.futures import ThreadPoolExecutor

        import torch
        from lmdeploy.vl.model.internvl import InternVLVisionModel

        self.model = InternVLVisionModel(model_path, trust_remote_code=True)
        self.model.build_preprocessor()
        self.model.set_mm_feature_dtype(torch.float32)
        self._uses_new_preprocess = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdeploy-own")
        self.threads_used = []
        preprocess = self.model.preprocess

        def recording(messages):
            import threading

            self.threads_used.append(threading.current_thread().name)
            return preprocess(messages)

        self.model.preprocess = recording

    async def preprocess(self, messages, mm_processor_kwargs=None):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self.model.preprocess, messages
        )


class FakePromptProcessor:
    """LMDeploy's own request-side code, as its engines call it: message parsing, InternVL
    preprocessing (tiles) by the image encoder, the chat template it was handed and its tokenizer."""

    def __init__(self, vl_encoder, template, model_path):
        from lmdeploy import Tokenizer

        self.vl_encoder = vl_encoder
        self.template, self.tokenizer = template, Tokenizer(model_path, trust_remote_code=True)

    async def get_prompt_input(self, prompt, do_preprocess=True, **kwargs):
        from lmdeploy.serve.processors.multimodal import MultimodalProcessor

        parsed = await self.vl_encoder.preprocess(
            await MultimodalProcessor.async_parse_multimodal_item(prompt)
        )
        return self.vl_encoder.model.to_pytorch(parsed, self.template, self.tokenizer)


class FakePipeline:
    """Stands in for LMDeploy's GPU pipeline only: builds each request's prompt with LMDeploy's
    own prompt code (as the real engine does), records what the engine hands it, answers."""

    calls = []

    def __init__(self, model_path, backend_config=None, chat_template_config=None, trust_remote_code=False):
        import types

        self.model_path, self.backend_config, self.trust_remote_code = (
            model_path,
            backend_config,
            trust_remote_code,
        )
        self.chat_template = chat_template_config.chat_template()
        encoder = FakeImageEncoder(model_path)
        processor = FakePromptProcessor(encoder, self.chat_template, model_path)
        from lmdeploy import Tokenizer

        self.async_engine = types.SimpleNamespace(
            prompt_processor=processor, vl_encoder=encoder, tokenizer=Tokenizer(model_path)
        )
        FakePipeline.calls.append(self)

    def close(self):
        self.closed = True

    def __call__(self, requests, gen_config=None):
        import asyncio

        self.requests, self.gen_config, self.texts = requests, gen_config, []
        built = [
            asyncio.run(self.async_engine.prompt_processor.get_prompt_input(prompt=r, do_preprocess=True))
            for r in requests
        ]
        return [self.answer(b["input_ids"], f" 回答{i} ") for i, b in enumerate(built)]

    def answer(self, input_ids, text):
        """The engine's answer ``text`` as LMDeploy's pipeline returns it: the generated ids, and
        the text its tokenizer wrapper makes of them (AsyncEngine.generate)."""
        from lmdeploy.messages import Response
        from lmdeploy.tokenizer import DetokenizeState

        tokenizer = self.async_engine.tokenizer
        generated = tokenizer.encode(text, add_bos=False)
        response, _ = tokenizer.detokenize_incrementally(
            list(input_ids) + generated,
            DetokenizeState(len(input_ids)),
            skip_special_tokens=True,
            spaces_between_special_tokens=True,
        )
        self.texts.append(response)
        return Response(
            text=response,
            generate_token_len=len(generated),
            input_token_len=len(input_ids),
            finish_reason="stop",
            token_ids=generated,
        )


def test_lmdeploy_engine_passes_the_template_and_config_and_writes_the_same_fields(
    monkeypatch, tiny_model, demo_dataset, eval_file, tmp_path
):
    import lmdeploy
    from PIL import Image

    monkeypatch.setattr(lmdeploy, "pipeline", FakePipeline)
    gen = dict(GEN, do_sample=True, temperature=0.7, top_p=0.9, seed=5)
    # Second record on a 300x900 image: several tiles plus the thumbnail.
    recs = evaluate.read_eval(eval_file)
    recs[1]["image"] = "images/demo003.jpg"
    eval_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    n = evaluate.generate(
        tiny_model,
        eval_file,
        demo_dataset,
        "lmdeploy",
        tmp_path / "p.jsonl",
        gen,
        batch_size=2,
        session_len=4096,
    )
    assert n == 2
    pipe = FakePipeline.calls[-1]
    assert pipe.backend_config.session_len == 4096 and pipe.backend_config.max_batch_size == 2
    assert type(pipe.backend_config).__name__ == "PytorchEngineConfig" and pipe.trust_remote_code
    # the engine in its own process, away from the image workers' interpreter lock
    assert pipe.backend_config.enable_mp_engine is True
    g = pipe.gen_config
    assert (g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.random_seed) == (4, True, 0.7, 0.9, 5)
    assert pipe.chat_template.meta_instruction == SYSTEM_PROMPT and pipe.chat_template.separator == ""
    content = pipe.requests[0][0]["content"]
    # The image first, as training puts <img>...</img> before the question; the training tile limit.
    assert (
        isinstance(content[0]["image_data"]["data"], Image.Image)
        and content[0]["image_data"]["max_dynamic_patch"]
        == json.loads((tiny_model / "config.json").read_text())["max_dynamic_patch"]
    )
    assert content[1] == dict(type="text", text="请你根据这张图片,讲一个脑洞大开的梗。")
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(rows[0]) == FIELDS
    assert (
        rows[0]["prediction"] == "回答0"
        and rows[0]["engine"] == "lmdeploy"
        and rows[0]["engine_version"] == "0.18.0"
    )
    # The answer's ids as LMDeploy returned them, its text decoded here as the transformers engine
    # does; LMDeploy's own per-token detokenization (seconds per pass) did not run.
    assert rows[0]["engine_backend"] == "pytorch" and pipe.texts == ["", ""]
    answer_ids = pipe.async_engine.tokenizer.encode(" 回答0 ", add_bos=False)
    assert rows[0]["completion_ids"] == answer_ids and rows[0]["completion_tokens"] == len(answer_ids)
    assert rows[0]["prompt"] == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|><|im_start|>user\n<img><IMG_CONTEXT>*256</img>\n"
        "请你根据这张图片,讲一个脑洞大开的梗。<|im_end|><|im_start|>assistant\n"
    )
    # The prompt field is the transformers engine's, record for record.
    engine = evaluate.TransformersEngine(tiny_model, GEN, device="cpu")
    _, prompts, _ = engine.prepare(evaluate.read_eval(eval_file), demo_dataset)
    assert [r["prompt"] for r in rows] == [evaluate.abbreviate(p) for p in prompts]
    # ... and so are the token ids LMDeploy built (digest) and its image-token count.
    trows = [
        dict(r, id=rec["id"])
        for rec, r in zip(
            evaluate.read_eval(eval_file), engine.generate(evaluate.read_eval(eval_file), demo_dataset)
        )
    ]
    assert [r["prompt_ids_digest"] for r in rows] == [r["prompt_ids_digest"] for r in trows]
    assert [r["image_tokens"] for r in rows] == [r["image_tokens"] for r in trows] and rows[1][
        "image_tokens"
    ] > 256
    assert "<IMG_CONTEXT>*256</img>" not in rows[1]["prompt"]
    # One thread asked for: LMDeploy's own worker prepared the images.
    assert set(pipe.async_engine.vl_encoder.threads_used) == {"lmdeploy-own_0"}


def test_lmdeploy_engine_prepares_images_on_the_threads_asked_for_with_the_same_prompts(
    monkeypatch, tiny_model, demo_dataset, eval_file, tmp_path
):
    import lmdeploy

    monkeypatch.setattr(lmdeploy, "pipeline", FakePipeline)
    digests = {}
    for threads in (1, 3):
        out = tmp_path / f"p{threads}.jsonl"
        evaluate.generate(
            tiny_model, eval_file, demo_dataset, "lmdeploy", out, GEN, batch_size=2, threads=threads
        )
        digests[threads] = [json.loads(l)["prompt_ids_digest"] for l in out.read_text().splitlines()]
        used = set(FakePipeline.calls[-1].async_engine.vl_encoder.threads_used)
        assert used and all(
            n.startswith("lmdeploy-preprocess" if threads > 1 else "lmdeploy-own") for n in used
        )
    assert digests[1] == digests[3] and len(digests[1]) == 2


def test_lmdeploy_engine_is_closed_when_a_record_fails(
    monkeypatch, tiny_model, demo_dataset, eval_file, tmp_path
):
    """LMDeploy's engine is a process of its own holding the GPU: a failing record must not leave
    it running (nor a partial predictions file)."""
    import lmdeploy

    monkeypatch.setattr(lmdeploy, "pipeline", FakePipeline)
    recs = evaluate.read_eval(eval_file)
    recs[1]["image"] = "images/gone.jpg"
    eval_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    out = tmp_path / "p.jsonl"
    with pytest.raises(Exception, match=r"images/gone\.jpg does not exist"):
        evaluate.generate(
            tiny_model, eval_file, demo_dataset, "lmdeploy", out, GEN, batch_size=2, session_len=4096
        )
    assert getattr(FakePipeline.calls[-1], "closed", False) and not out.exists()


def test_lmdeploy_engine_names_a_pipeline_without_an_image_encoder(monkeypatch, tiny_model):
    import lmdeploy

    from vlmtune.lmdeploy_engine import LMDeployEngine, LMDeployError

    class NoEncoderPipeline(FakePipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self.async_engine.vl_encoder

    monkeypatch.setattr(lmdeploy, "pipeline", NoEncoderPipeline)
    with pytest.raises(LMDeployError, match="no image encoder.*cpus_per_task: 1"):
        LMDeployEngine(tiny_model, GEN, 4096, 2, preprocess_threads=4)
    assert FakePipeline.calls[-1].closed  # the engine (its GPU memory) is released


def test_built_models_state_the_llm_s_untied_head_where_lmdeploy_reads_it(tiny_model):
    from transformers import AutoConfig

    from vlmtune.lmdeploy_engine import config_overrides

    cfg = AutoConfig.from_pretrained(str(tiny_model), trust_remote_code=True)
    assert cfg.tie_word_embeddings is False and cfg.llm_config.tie_word_embeddings is False
    assert config_overrides(tiny_model) == {}


def test_lmdeploy_engine_tells_lmdeploy_the_llm_s_head_when_the_chat_config_says_otherwise(
    monkeypatch, tiny_model, tmp_path
):
    """Config code without InternVL's copy of the LLM's tie_word_embeddings, and a config.json
    without the key (as this project's builder wrote them before), leave the chat config at
    PretrainedConfig's default (tied): LMDeploy must be told the LLM's value."""
    import shutil

    import lmdeploy

    from vlmtune.lmdeploy_engine import LMDeployEngine

    folder = tmp_path / "merged-without-the-line"
    shutil.copytree(tiny_model, folder)
    code = folder / "configuration_internvl_chat.py"
    text = code.read_text(encoding="utf-8")
    line = "self.tie_word_embeddings = self.llm_config.tie_word_embeddings"
    assert line in text
    code.write_text(text.replace(line, "pass"), encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    del config["tie_word_embeddings"]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.setattr(lmdeploy, "pipeline", FakePipeline)
    runner = LMDeployEngine(folder, GEN, 4096, 2)
    assert runner.overrides == {"tie_word_embeddings": False}
    assert FakePipeline.calls[-1].backend_config.hf_overrides == {"tie_word_embeddings": False}
    LMDeployEngine(tiny_model, GEN, 4096, 2)
    assert FakePipeline.calls[-1].backend_config.hf_overrides is None


# LMDeploy's engine-process side of its ZMQ link: answers with what arrived, per tensor.
RPC_SERVER = """
import asyncio, hashlib, sys
import torch
from lmdeploy.pytorch.engine.mp_engine.zmq_rpc import AsyncRPCServer

def arrived(multimodal):
    return [
        {key: (str(t.dtype), tuple(t.shape), hashlib.sha256(t.contiguous().view(-1).view(torch.uint8)
               .numpy().tobytes()).hexdigest()) for key, t in item.items()}
        for item in multimodal
    ]

server = AsyncRPCServer()
server.register_method("arrived", arrived)
print(server.get_port(), flush=True)
asyncio.run(server.run())
"""


@pytest.mark.parametrize("handover", ["buffer", "pickle"])
def test_tiles_reach_lmdeploy_s_engine_process_bit_for_bit(handover):
    """Requests travel to the PyTorch engine's process over LMDeploy's own ZMQ link; with the
    raw-bytes hand-over every tensor (dtype, shape, bytes) must arrive as sent in a fresh
    interpreter, as with LMDeploy's plain pickling."""
    import hashlib
    import subprocess

    import torch
    from lmdeploy.pytorch.engine.mp_engine import zmq_rpc

    from vlmtune.lmdeploy_engine import install_tensor_handover

    sent = dict(
        tiles=torch.randn(7, 3, 448, 448).to(torch.bfloat16),
        strided=torch.arange(20).reshape(4, 5)[:, ::2],
        scalar=torch.tensor(0.25),
        empty=torch.zeros(0, 3),
        flags=torch.tensor([True, False, True]),
        grad=torch.ones(3, requires_grad=True),
    )
    expected = {
        key: (
            str(t.dtype),
            tuple(t.shape),
            hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
        )
        for key, t in sent.items()
    }
    assert install_tensor_handover(handover)
    server = subprocess.Popen([sys.executable, "-c", RPC_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        client = zmq_rpc.AsyncRPCClient(port=int(server.stdout.readline()))
        payload = zmq_rpc.pickle.dumps(dict(multimodal=[sent]))
        assert (b"_tensor_from_buffer" in payload) == (handover == "buffer")
        got = client.call("arrived", multimodal=[sent])
        client.close_sockets()
    finally:
        server.kill()
        install_tensor_handover("buffer")
    assert got == [expected]


def test_an_unknown_tensor_handover_is_named():
    from vlmtune.lmdeploy_engine import LMDeployError, install_tensor_handover

    with pytest.raises(LMDeployError, match="'shm'"):
        install_tensor_handover("shm")


def test_lmdeploy_s_periodic_memory_trim_is_off_unless_the_user_sets_it(monkeypatch, tiny_model):
    """LMDeploy's engine stalls every 128 image requests to trim host memory; the engine's
    process reads the setting when it starts. A value the user exported is left alone."""
    import os

    import lmdeploy

    from vlmtune.lmdeploy_engine import TRIM_COUNT_VARIABLE, LMDeployEngine

    monkeypatch.setattr(lmdeploy, "pipeline", FakePipeline)
    monkeypatch.delenv(TRIM_COUNT_VARIABLE, raising=False)
    LMDeployEngine(tiny_model, GEN, 4096, 2)
    assert os.environ[TRIM_COUNT_VARIABLE] == "0"
    monkeypatch.setenv(TRIM_COUNT_VARIABLE, "512")
    LMDeployEngine(tiny_model, GEN, 4096, 2)
    assert os.environ[TRIM_COUNT_VARIABLE] == "512"
