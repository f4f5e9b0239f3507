"""`LLM`: the offline facade. `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from inference_pio import envs
from inference_pio.config import (
    DEFAULT_KV_CACHE_BYTES,
    ConfigError,
    EngineConfig,
    ModelConfig,
    resolve_dtype,
)
from inference_pio.engine.llm_engine import LLMEngine
from inference_pio.engine.outputs import RequestFailedError, RequestOutput
from inference_pio.engine.scheduler import SchedulerConfig
from inference_pio.layers.attention import check_attention_backend
from inference_pio.layers.quantization import QuantConfig, QuantizationError, parse_quantization
from inference_pio.models.default_model import default_model_dir, random_weights_warning
from inference_pio.models.hub import resolve_model
from inference_pio.models.loader import LoadConfig, load_model, open_model_dir
from inference_pio.models.weight_plan import WeightBudgetError
from inference_pio.runtime.kv_cache import PagedKVCache, kv_bytes_per_token, plan_kv_cache
from inference_pio.runtime.kv_quant import resolve_kv_cache_format
from inference_pio.runtime.model_runner import ModelRunner
from inference_pio.runtime.threads import (
    ThreadChoice,
    active_weight_bytes,
    apply_threads,
    choose_threads,
    requested_threads,
)
from inference_pio.sampling_params import SamplingParams, eos_token_ids_from_generation_config
from inference_pio.tokenizer import Tokenizer
from inference_pio.utils.memory import free_memory_bytes

logger = logging.getLogger(__name__)

Prompt = str | list[int]


def resolve_model_dir(model: str | Path | None, *, revision: str | None = None,
                      allow_download: bool | None = None) -> tuple[Path, bool]:
    """(directory, is_embedded_default). None means INFERENCE_PIO_MODEL, else the default."""
    name = str(model) if model is not None else envs.default_model()
    if name is None:
        path = default_model_dir()
        logger.warning(random_weights_warning(path))
        return path, True
    return resolve_model(name, revision=revision, allow_download=allow_download), False


def default_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": the checkpoint's dtype on an accelerator; float32 on the CPU, where bf16/fp16
    matmuls are dozens of times slower than fp32 on machines without native support."""
    if device.type == "cpu":
        return torch.float32
    return resolve_dtype(config.torch_dtype)


class LLM:
    """Loads a model directory (or hub id, or the embedded default) and serves it through the
    engine. Engine options are those of `EngineConfig` (also `pio` flags). Weight options:
    `quantization` (fp32, bf16, fp16, int8, int4, nf4, fp8; None: the checkpoint's format),
    `group_size` (int4 group / nf4 block: 32, 64, 128), `quantize_lm_head` (None: yes for int4
    and int8, no for the other formats), `weight_memory`
    (bytes for weights; below the model's size, experts are paged from disk) and
    `prefetch_experts` (read a layer's routed experts in the background while others compute).
    `num_threads`: CPU threads for torch and the native kernels, set once at load (None or
    "auto": $INFERENCE_PIO_NUM_THREADS, else the policy of `runtime.threads`); `self.threads`
    says what was chosen and why."""

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "cpu", revision: str | None = None,
                 allow_download: bool | None = None, progress: bool = True,
                 block_size: int = 16, kv_cache_memory: float | None = None,
                 kv_cache_dtype: str = "auto", max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 sliding_window: int | None = None, attention_backend: str = "auto",
                 quantization: str | QuantConfig | None = None, group_size: int | None = None,
                 quantize_lm_head: bool | None = None, weight_memory: int | None = None,
                 prefetch_experts: bool = True, num_threads: int | str | None = None) -> None:
        requested = requested_threads(num_threads)  # checked before anything slow
        if requested is not None:
            apply_threads(ThreadChoice(requested, "requested"))  # loading uses them too
        self.engine_config = EngineConfig(
            block_size=block_size, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill, sliding_window=sliding_window,
            attention_backend=attention_backend)
        # a backend that cannot run on this device says so before any weight is read
        check_attention_backend(attention_backend, device)
        self.model_dir, self.is_default_model = resolve_model_dir(
            model, revision=revision, allow_download=allow_download)
        self.device = torch.device(device)
        files = open_model_dir(self.model_dir)
        config = ModelConfig.from_file(files.config_path)
        self.dtype = default_dtype(config, self.device) if dtype == "auto" else resolve_dtype(dtype)
        try:
            self.load_config = LoadConfig(
                quantization=parse_quantization(quantization, group_size, quantize_lm_head),
                weight_memory=weight_memory, prefetch=prefetch_experts)
            self.model, self.config = load_model(files, self.dtype, self.device, progress=progress,
                                                 load_config=self.load_config)
        except (QuantizationError, WeightBudgetError) as e:
            raise ConfigError(str(e)) from None
        self._finish_init(Tokenizer.from_pretrained(self.model_dir),
                          files.generation_config or {}, max_model_len, requested)

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: ModelConfig, tokenizer: Tokenizer, *,
                   dtype: torch.dtype, device: str | torch.device = "cpu",
                   generation_config: dict[str, Any] | None = None,
                   max_model_len: int | None = None, num_threads: int | str | None = None,
                   **engine_options: Any) -> LLM:
        """Serve a model already built in memory (e.g. a synthetic one for `pio bench`)."""
        requested = requested_threads(num_threads)
        self = cls.__new__(cls)
        self.engine_config = EngineConfig(max_model_len=max_model_len, **engine_options)
        self.model_dir, self.is_default_model = None, False
        self.device, self.dtype, self.model, self.config = (
            torch.device(device), dtype, model, config)
        self.load_config = LoadConfig()
        self._finish_init(tokenizer, generation_config or {}, max_model_len, requested)
        return self

    def _finish_init(self, tokenizer: Tokenizer, generation_config: dict[str, Any],
                     max_model_len: int | None, requested_threads: int | None) -> None:
        per_token = (active_weight_bytes(self.model, self.config)
                     if hasattr(self.model, "model") else None)
        self.threads: ThreadChoice = apply_threads(choose_threads(requested_threads, per_token))
        self.weight_plan = getattr(self.model, "weight_plan", None)
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.max_model_len = _check_max_model_len(max_model_len, self.config)
        eos = (eos_token_ids_from_generation_config(self.generation_config)
               or self.config.eos_token_ids or (self.tokenizer.eos_token_id,))
        self.engine = self._build_engine(eos)
        self._ids = itertools.count()

    def _build_engine(self, eos: tuple[int, ...]) -> LLMEngine:
        cfg = self.engine_config
        window = cfg.sliding_window or self.config.sliding_window
        plan = plan_kv_cache(self.config, self._kv_budget(), cfg.block_size, cfg.kv_cache_dtype,
                             self.dtype, self.device)
        logger.info("%s", plan.describe())
        self.kv_cache_plan = plan
        kv_cache = PagedKVCache.from_plan(self.config, plan, self.dtype, self.device)
        runner = ModelRunner(self.model, self.config, self.tokenizer.vocab_size, kv_cache,
                             self.device, cfg.attention_backend, cfg.sliding_window)
        scheduler_config = SchedulerConfig(
            num_blocks=plan.num_blocks, max_model_len=self.max_model_len,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            block_size=cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching,
            enable_chunked_prefill=cfg.enable_chunked_prefill, sliding_window=window)
        return LLMEngine(runner, self.tokenizer, eos, scheduler_config)

    def _kv_budget(self) -> int | float:
        """The user's kv_cache_memory, else min(4 GiB, half of free memory, what max_num_seqs
        full-length sequences need)."""
        if self.engine_config.kv_cache_memory is not None:
            return self.engine_config.kv_cache_memory
        per_token = kv_bytes_per_token(
            self.config, resolve_kv_cache_format(self.engine_config.kv_cache_dtype, self.dtype,
                                                 self.device))
        needed = per_token * self.max_model_len * self.engine_config.max_num_seqs
        free_half = free_memory_bytes(self.device) // 2
        return max(1, min(DEFAULT_KV_CACHE_BYTES, free_half, needed))

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with `overrides` on top."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order.

        A request aborted meanwhile (`llm.engine.abort_request` from another thread) comes back
        finished with finish_reason "abort". If the engine failed a request, the others still
        run to the end, then RequestFailedError is raised for the first failed one; its
        `outputs` holds every request's output (the failed ones with finish_reason "error")."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list), self.default_sampling_params)
        ids = [f"gen-{next(self._ids)}" for _ in prompt_list]
        try:
            for request_id, prompt, p in zip(ids, prompt_list, params):
                self.engine.add_request(request_id, prompt, p)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        outputs = self._run(ids, use_tqdm)
        failed = next((o for o in outputs if o.error is not None), None)
        if failed is not None:
            raise RequestFailedError(failed.request_id, failed.error or "", outputs)
        return outputs

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None
                        ) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it (see `delta_text`);
        closing the iterator early aborts the request and frees its KV. A request the engine
        failed raises RequestFailedError."""
        params = sampling_params or self.default_sampling_params()
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, params)
        finished = False
        try:
            while not finished and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        if out.error is not None:
                            raise RequestFailedError(request_id, out.error)
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(request_id)

    def chat(self, messages: Sequence[Mapping[str, Any]],
             sampling_params: SamplingParams | None = None,
             tools: Sequence[Mapping[str, Any]] | None = None,
             use_tqdm: bool = False) -> RequestOutput:
        """One chat turn: render the chat template, generate the assistant's reply."""
        prompt = self.tokenizer.apply_chat_template(list(messages), tools=tools,
                                                    add_generation_prompt=True)
        return self.generate([self.tokenizer.encode(prompt)], sampling_params, use_tqdm)[0]

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", file=sys.stderr,
                   disable=None if use_tqdm else True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
            # An abort from another thread during the last step ended the loop before a step
            # returned its output; this step (nothing left to run) returns it.
            finished.update((o.request_id, o) for o in self.engine.step()
                            if o.finished and o.request_id in wanted)
        except BaseException:
            for request_id in ids:  # leave no half-run request behind (e.g. on Ctrl-C)
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]


def _check_max_model_len(requested: int | None, config: ModelConfig) -> int:
    if requested is None:
        return config.max_position_embeddings
    if not 1 < requested <= config.max_position_embeddings:
        raise ConfigError(f"max_model_len={requested} must be in 2..{config.max_position_embeddings}"
                          " (the model's max_position_embeddings)")
    return requested


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, bytes | bytearray | memoryview):
        raise TypeError(f"prompts is {type(prompts).__name__}: decode it to str (text), or pass "
                        "a list of token ids")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts is a {type(prompts).__name__}: give text, a list of token ids, "
                        "or a list of those")
    items = list(prompts)
    if items and all(isinstance(p, int) for p in items):
        return [items]  # one prompt given as token ids
    for i, p in enumerate(items):
        if not isinstance(p, str) and not (
                isinstance(p, list) and all(isinstance(t, int) for t in p)):
            raise TypeError(f"prompt {i} is a {type(p).__name__}; give text or a list of token ids")
    return items


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int,
                    default: Any) -> list[SamplingParams]:
    if params is None:
        return [default()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts: give one, or one per "
                         "prompt")
    return params
