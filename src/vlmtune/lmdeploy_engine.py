"""Batch generation with LMDeploy (0.18), sending exactly the training prompt and tiles.

LMDeploy builds the prompt from OpenAI-style messages with the chat template it is handed and
tiles each image with its own copy of InternVL's ``dynamic_preprocess``. Three things keep that
identical to what XTuner trained on (docs/lmdeploy.md):

- the chat template is passed explicitly (:meth:`vlmtune.prompt.ChatFormat.lmdeploy` of the model's LLM), so
  neither the model folder's name nor the tokenizer's own template decides it;
- the image item comes before the question text: LMDeploy's InternVL code writes the items in
  message order, and training puts ``<img>…</img>\\n`` first;
- the tile settings are the model's ``config.json`` ones, which XTuner reads too, and the tile
  size LMDeploy uses (``vision_config.image_size``) must equal ``force_image_size``.

And one keeps the model the same: LMDeploy decides whether the output head is the token
embedding from the chat model's config, not the LLM's (:func:`config_overrides`).

:class:`LMDeployEngine` records, per request, the prompt text and token ids that LMDeploy's
engine really feeds its LLM (read where its request path builds them), so predictions can be
compared token for token with the transformers engine and with training.

What LMDeploy does by default and this module changes, so that the GPU is kept fed
(docs/lmdeploy.md, benchmarks/RESULTS.md):

- LMDeploy 0.18 prepares every request's image (resize, crops, normalisation) on one worker
  thread of its image encoder, one request after another (2.1 s for 64 CLoT-sized images on an
  H200 machine); :class:`LMDeployEngine` runs that step on ``preprocess_threads`` workers, each
  with one torch thread;
- the PyTorch engine runs in its own process (LMDeploy's ``enable_mp_engine``, what its API
  server does), so its scheduling loop does not share the interpreter lock with those workers;
  the tiles reach it as raw bytes (:func:`install_tensor_handover`);
- answers are decoded here from LMDeploy's token ids, as the transformers engine decodes them
  (LMDeploy's own detokenization took seconds per 64 answers), and LMDeploy's memory trim every
  128 image requests is off unless the user sets it.

On an H200 host of the slower kind, 64 records: 21.4 prompts/s, 11.5× the transformers engine,
against 17.3 and 9.3× in the same call with the one-thread workers, the raw-bytes hand-over and
the last point undone.
"""

from __future__ import annotations

import asyncio
import copyreg
import functools
import importlib.metadata
import io
import json
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from .hashing import ids_digest
from .prompt import IMG_CONTEXT, chat_format, user_text

BACKENDS = ("pytorch", "turbomind")
HANDOVERS = ("buffer", "pickle")
TRIM_COUNT_VARIABLE = "LMDEPLOY_MULTIMODAL_SESSION_TRIM_COUNT"


class LMDeployError(Exception):
    pass


def tiling(model_dir: Path) -> dict:
    """The tile settings XTuner trains with (the model's config.json), checked against the tile
    size LMDeploy's InternVL preprocessing uses."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    vision = cfg["vision_config"]
    if vision["image_size"] != cfg["force_image_size"]:
        raise LMDeployError(
            f"{model_dir}/config.json: vision_config.image_size {vision['image_size']} differs from "
            f"force_image_size {cfg['force_image_size']}: LMDeploy would tile images unlike training"
        )
    return dict(
        min_tiles=cfg["min_dynamic_patch"],
        max_tiles=cfg["max_dynamic_patch"],
        tile_size=cfg["force_image_size"],
        thumbnail=cfg["use_thumbnail"],
        tokens_per_tile=int(
            (cfg["force_image_size"] // vision["patch_size"]) ** 2 * cfg["downsample_ratio"] ** 2
        ),
    )


def config_overrides(model_dir: Path) -> dict:
    """Config fields LMDeploy must be told, as ``hf_overrides``, to build the model the folder holds.

    LMDeploy's InternVL model ties its output head to the token embeddings when the *chat*
    config's ``tie_word_embeddings`` is true, while the transformers code reads only the LLM's.
    InternVL's own config code copies the LLM's value up; config code that does not leaves
    PretrainedConfig's default (true), and LMDeploy then answers with another model's head.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    llm = getattr(cfg, "llm_config", None)
    if llm is None or bool(cfg.tie_word_embeddings) == bool(llm.tie_word_embeddings):
        return {}
    return {"tie_word_embeddings": bool(llm.tie_word_embeddings)}


def _tensor_from_buffer(buffer: bytearray, dtype: str, shape: tuple):
    """A CPU tensor rebuilt, without a copy, from the bytes :func:`_reduce_tensor` wrote (runs in
    LMDeploy's engine process when it unpickles a request)."""
    import torch

    return torch.frombuffer(buffer, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def _reduce_tensor(tensor):
    """Pickle a plain CPU tensor as its raw bytes (one copy into the pickle, none out of it);
    anything else the way torch pickles it. Torch's own way writes each storage with
    ``torch.save`` and reads it back with ``torch.load``: 5.6 and 2.2 ms for one 7-tile image's
    8.4 MB of bf16 tiles on the development machine, against 1.9 and 1.1 ms this way."""
    import torch

    if (
        tensor.device.type != "cpu"
        or tensor.layout != torch.strided
        or tensor.requires_grad
        or tensor.is_conj()
        or tensor.is_neg()
        or tensor.is_quantized
        or tensor.numel() == 0
    ):
        return tensor.__reduce_ex__(pickle.DEFAULT_PROTOCOL)
    dense = tensor.contiguous()
    raw = dense.view(-1).view(torch.uint8).numpy()
    dtype = str(dense.dtype).removeprefix("torch.")
    return _tensor_from_buffer, (pickle.PickleBuffer(raw), dtype, tuple(dense.shape))


@functools.cache
def _tensor_bytes_pickler() -> type:
    import torch

    class TensorBytesPickler(pickle.Pickler):
        # exact type only: tensor subclasses (parameters) keep torch's own way
        dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}

    return TensorBytesPickler


def _handover_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _tensor_bytes_pickler()(buffer, protocol=5).dump(obj)
    return buffer.getvalue()


def install_tensor_handover(handover: str) -> bool:
    """How requests' image tiles travel to LMDeploy's engine process: ``pickle`` is LMDeploy's
    own (plain ``pickle.dumps`` on its ZMQ link), ``buffer`` sends each tensor's raw bytes
    (:func:`_reduce_tensor`). The pickling runs on the pipeline's event-loop thread, one request
    after another, for every image of every request (~8 MB each), so its cost bounds how fast
    requests reach the engine. Returns whether LMDeploy's link was found (0.18's layout);
    without it requests go LMDeploy's own way."""
    if handover not in HANDOVERS:
        raise LMDeployError(
            f"evaluate: unknown tensor hand-over {handover!r}; choose one of {', '.join(HANDOVERS)}"
        )
    try:
        from lmdeploy.pytorch.engine.mp_engine import zmq_rpc
    except ImportError:
        return False
    if not hasattr(zmq_rpc, "pickle"):
        return False
    raw_bytes = SimpleNamespace(dumps=_handover_dumps, loads=pickle.loads)
    zmq_rpc.pickle = raw_bytes if handover == "buffer" else pickle
    return True


def _set_worker_torch_threads(threads: int) -> None:
    """Image worker initializer: torch's operations there run on ``threads`` threads (0: torch's
    default, a team as large as the host's cores for each worker's tensor operations, workers
    times cores in all). Torch keeps the number for threads started later in this process too."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def messages(question: str, image, max_tiles: int) -> list[dict]:
    """One request in LMDeploy's message format: the image (PIL) first, then the question as
    XTuner keeps it; ``max_dynamic_patch`` pins the tile limit to the training one."""
    image_item = dict(type="image_data", image_data=dict(data=image, max_dynamic_patch=max_tiles))
    return [dict(role="user", content=[image_item, dict(type="text", text=user_text(question))])]


def _image_of(request) -> object | None:
    """The PIL image of one request built by :func:`messages` (None for any other request)."""
    for message in request if isinstance(request, list) else [request]:
        content = message.get("content")
        items = content if isinstance(content, list) else []
        for item in items:
            if item.get("type") == "image_data":
                return item["image_data"]["data"]
    return None


def prompt_ids(model_dir: Path, image, question: str, template_config=None) -> tuple[list[int], str]:
    """Token ids and text LMDeploy's own request code builds for one question and image, without
    a GPU: its message parsing, InternVL preprocessing, chat template and tokenizer, as the
    PyTorch engine's request path runs them. For tests and the GPU benchmark's cross-check."""
    import torch
    from lmdeploy import Tokenizer
    from lmdeploy.serve.processors.multimodal import MultimodalProcessor
    from lmdeploy.vl.model.internvl import InternVLVisionModel

    settings = tiling(model_dir)
    parsed = asyncio.run(
        MultimodalProcessor.async_parse_multimodal_item(messages(question, image, settings["max_tiles"]))
    )
    vision = InternVLVisionModel(str(model_dir), trust_remote_code=True)
    vision.build_preprocessor()
    vision.set_mm_feature_dtype(torch.float32)
    parsed = vision.preprocess(parsed)
    # the model's training prompt (its LLM's: InternLM2 or Phi-3) unless a template is given
    template = (template_config or chat_format(model_dir).lmdeploy()).chat_template()
    out = vision.to_pytorch(parsed, template, Tokenizer(str(model_dir), trust_remote_code=True))
    return list(out["input_ids"]), out["prompt"]


class LMDeployEngine:
    """LMDeploy's batch pipeline (PyTorch or TurboMind back end) over the held-out records."""

    name = "lmdeploy"

    def __init__(
        self,
        model_dir: Path,
        gen: dict,
        session_len: int,
        batch_size: int,
        backend: str = "pytorch",
        preprocess_threads: int = 1,
        worker_torch_threads: int = 1,
        tensor_handover: str = "buffer",
        **engine_options,
    ):
        """Build LMDeploy's pipeline for ``model_dir``.

        Args:
            model_dir: an InternVL2 folder in the official layout (a merged model or the base).
            gen: the generation settings (``vlmtune.evaluate.GENERATION_KEYS``).
            session_len: the longest prompt plus answer in tokens.
            batch_size: LMDeploy's ``max_batch_size`` (requests decoded together).
            backend: ``pytorch`` (runs on the installed torch) or ``turbomind``.
            preprocess_threads: workers preparing the requests' images (LMDeploy's own: 1).
            worker_torch_threads: torch threads of each such worker (0: torch's default).
            tensor_handover: how the tiles reach the PyTorch engine's process:
                ``buffer`` (raw bytes) or ``pickle`` (LMDeploy's own; :func:`install_tensor_handover`).
            engine_options: further fields of the back end's engine config (the parity benchmark
                sets ``logprobs_mode``).
        """
        from lmdeploy import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline

        if backend not in BACKENDS:
            raise LMDeployError(
                f"evaluate: unknown LMDeploy back end {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        self.tiling = tiling(model_dir)
        self.overrides = config_overrides(model_dir)
        if self.overrides:
            engine_options = dict(engine_options, hf_overrides=self.overrides)
        if backend == "pytorch":
            # The engine in its own process: its loop then never waits for the interpreter lock
            # held by the image workers of this one (a benchmark may still set it False).
            engine_options = {"enable_mp_engine": True, **engine_options}
            install_tensor_handover(tensor_handover)
            # Every 128 image requests ended, LMDeploy's engine runs gc.collect() and malloc_trim
            # in its scheduling thread (a server's guard against creeping host memory), during
            # which no request advances (~10 % of that thread's py-spy samples on an H200 host).
            # A batch job holds at most a batch of images; the user's own setting wins. Read when
            # the engine's process starts.
            os.environ.setdefault(TRIM_COUNT_VARIABLE, "0")
        engine_config = (PytorchEngineConfig if backend == "pytorch" else TurbomindEngineConfig)(
            session_len=session_len, max_batch_size=batch_size, **engine_options
        )
        # trust_remote_code: InternVL2's config and tokenizer are remote code (0.18 defaults to
        # False and then fails on the config); the template is the training one, never guessed.
        self.pipe = pipeline(
            str(model_dir),
            backend_config=engine_config,
            chat_template_config=chat_format(model_dir).lmdeploy(),
            trust_remote_code=True,
        )
        self.gen_config = GenerationConfig(
            max_new_tokens=gen["max_new_tokens"],
            do_sample=gen["do_sample"],
            top_p=gen["top_p"],
            temperature=gen["temperature"],
            random_seed=gen["seed"],
        )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        self.img_context_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.backend = backend
        self.version = importlib.metadata.version("lmdeploy")
        self.fed: dict[int, tuple[str, list[int]]] = {}
        self.fed_at: list[float] = []  # perf_counter() when each request's prompt was built
        self._record_fed_prompts()
        self._ids_only_from_lmdeploy()
        self._pool = None
        if preprocess_threads > 1:
            self._pool = ThreadPoolExecutor(
                preprocess_threads,
                thread_name_prefix="lmdeploy-preprocess",
                initializer=_set_worker_torch_threads,
                initargs=(worker_torch_threads,),
            )
            self._parallel_preprocessing(self._pool, preprocess_threads)

    def _parallel_preprocessing(self, pool: ThreadPoolExecutor, threads: int) -> None:
        """Run the image encoder's CPU preprocessing on ``pool``. Only that step: LMDeploy's own
        single worker keeps running the vision forward (TurboMind back end), which must not run
        on two threads at once. Each request's images are prepared independently (InternVL's
        tiling is a pure function of the image and the tile settings)."""
        encoder = getattr(self.pipe.async_engine, "vl_encoder", None)
        if encoder is None or not hasattr(encoder, "preprocess") or not hasattr(encoder, "model"):
            self.close()  # the engine holds the GPU's memory
            raise LMDeployError(
                "evaluate: LMDeploy's pipeline has no image encoder to run preprocessing on "
                f"{threads} threads (its layout changed?); set evaluate.cpus_per_task: 1"
            )
        model = encoder.model

        async def preprocess(messages, input_prompt=None, mm_processor_kwargs=None):
            loop = asyncio.get_running_loop()
            if encoder._uses_new_preprocess:
                return await loop.run_in_executor(
                    pool, model.preprocess, messages, input_prompt, mm_processor_kwargs
                )
            return await loop.run_in_executor(pool, model.preprocess, messages)

        encoder.preprocess = preprocess

    def _ids_only_from_lmdeploy(self) -> None:
        """Take only token ids from LMDeploy's pipeline and decode them here, once per record, as
        the transformers engine does (``tokenizer.decode``, special tokens skipped).

        LMDeploy turns every request's output into text on its event-loop thread with
        transformers' ``convert_ids_to_tokens``, which recomputes the tokenizer's special-token
        ids for every token id: 2.1 s for 64 answers of 128 tokens on the development machine
        (0.05 s with ``decode``), at the end of the pass, while the GPU waits. The ids are
        unchanged: LMDeploy's pipeline takes them from the state's ``ids_offset``, kept here.
        """
        tokenizer = getattr(self.pipe.async_engine, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "detokenize_incrementally"):
            return  # another layout: LMDeploy's text is replaced all the same (generate)

        def ids_only(all_input_ids, state, *args, **kwargs):
            state.ids_offset = len(all_input_ids)
            return "", state

        tokenizer.detokenize_incrementally = ids_only

    def _record_fed_prompts(self) -> None:
        """Wrap the engine's prompt builder: every request's prompt text and ids, keyed by its image."""
        processor = self.pipe.async_engine.prompt_processor
        build = processor.get_prompt_input

        async def recording(*args, **kwargs):
            built = await build(*args, **kwargs)
            request = kwargs.get("prompt", args[0] if args else None)
            image = _image_of(request)
            if image is not None and isinstance(built, dict) and built.get("input_ids") is not None:
                self.fed[id(image)] = (built.get("prompt") or "", [int(t) for t in built["input_ids"]])
                self.fed_at.append(time.perf_counter())
            return built

        processor.get_prompt_input = recording

    def generate(self, batch: list[dict], image_folder: Path) -> list[dict]:
        from PIL import Image

        paths = [Path(image_folder) / rec["image"] for rec in batch]
        for path in paths:
            if not path.is_file():
                raise LMDeployError(f"evaluate: image {path} does not exist")

        def decode(path: Path):
            with Image.open(path) as img:
                return img.convert("RGB")

        # decoding releases the interpreter lock: on the image workers when there are several
        images = list(self._pool.map(decode, paths) if self._pool else map(decode, paths))
        requests = [
            messages(rec["question"], img, self.tiling["max_tiles"]) for rec, img in zip(batch, images)
        ]
        self.fed.clear()
        self.fed_at.clear()
        responses = self.pipe(requests, gen_config=self.gen_config)
        results = []
        for img, r in zip(images, responses):
            completion_ids = [int(t) for t in (r.token_ids or [])]
            prompt, ids = self.fed.get(id(img), ("", []))
            if not ids:
                raise LMDeployError(
                    "evaluate: LMDeploy built no prompt ids for a request (its request path changed?)"
                )
            n_image_tokens = ids.count(self.img_context_id)
            results.append(
                dict(
                    prompt=prompt.replace(IMG_CONTEXT, f"{IMG_CONTEXT}*{n_image_tokens}", 1)
                    if n_image_tokens
                    else prompt,
                    prediction=self.tokenizer.decode(completion_ids, skip_special_tokens=True).strip(),
                    prompt_tokens=len(ids),
                    prompt_ids_digest=ids_digest(ids),
                    image_tokens=n_image_tokens,
                    completion_tokens=r.generate_token_len,
                    completion_ids=completion_ids,
                    first_token_margin=None,
                    finish_reason=r.finish_reason,
                    engine_backend=self.backend,
                )
            )
        return results

    def close(self) -> None:
        close = getattr(self.pipe, "close", None)
        if close:
            close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
