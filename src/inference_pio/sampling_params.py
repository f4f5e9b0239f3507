"""SamplingParams: how one request is decoded and when it stops (vLLM-shaped, no torch here).

Frozen like every other config in the project: derive a variant with `dataclasses.replace`,
which re-runs validation."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# Below this a temperature is treated as 0 (greedy), as vLLM does: dividing logits by a
# near-zero temperature only adds overflow risk for the same argmax.
SAMPLING_EPS = 1e-5

# As vLLM's default max_logprobs: a top-k over the whole vocabulary per token is not free.
MAX_LOGPROBS = 20

# Upper bounds on the floats that scale logits (applied in float32). Above MAX_TEMPERATURE the
# distribution over a 150k vocabulary is uniform noise already; far above it the float32 divisor
# becomes inf and every logit NaN (temperature=1e308 gave '!!!'). A repetition penalty outside
# [MIN_, MAX_REPETITION_PENALTY] likewise turns logits into inf. Such values are refused, not
# clamped: a client asking for them has a bug we should tell it about.
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0

# generation_config.json keys that map 1:1 onto SamplingParams fields.
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. `temperature=0` means greedy; `top_k` 0 or -1 is off.

    Every value is checked here, so a step never meets one it cannot use: a bad value raises
    ValueError naming the field and its allowed range. Ranges: temperature in [0, 100] (below
    1e-5 greedy), top_k any integer >= -1 (values >= the vocabulary size keep every token, as in
    vLLM), top_p in (0, 1], min_p in [0, 1], repetition_penalty in [0.01, 100], presence and
    frequency penalties in [-2, 2]; NaN and infinities are refused everywhere. Token ids are
    checked against the model's vocabulary by the engine (`LLMEngine.add_request`), which
    knows it.

    `stop` and `stop_token_ids` are normalised to tuples on construction, whatever was passed.
    `max_tokens=None` generates until eos, a stop condition or the end of the context window.
    `logprobs=k` returns, per generated token, the sampled token plus the k most likely tokens of
    the model's raw distribution (before penalties, temperature and top-k/p)."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_token_ids(self.stop_token_ids))
        self._validate_counts()
        self._validate_sampling()
        self._validate_penalties()

    def _validate_counts(self) -> None:
        # Only one sequence per request is implemented; fail loudly instead of returning fewer.
        _require(_is_int(self.n) and self.n == 1, "n", self.n, "1 (n > 1 is not supported yet)")
        if self.max_tokens is not None:
            _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                     self.max_tokens, "an integer >= 1 or None")
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
                 self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None:
            _require(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                     f"<= max_tokens ({self.max_tokens})")
        if self.seed is not None:
            # torch.Generator.manual_seed takes exactly this range; beyond it a step would fail.
            _require(_is_int(self.seed) and -(2**63) <= self.seed < 2**64, "seed", self.seed,
                     "an integer in [-2**63, 2**64) or None")
        if self.logprobs is not None:
            _require(_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
                     self.logprobs, f"an integer in [0, {MAX_LOGPROBS}] or None")

    def _validate_sampling(self) -> None:
        _require(_is_real(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
                 "temperature", self.temperature,
                 f"a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k,
                 "an integer >= 1, or 0 / -1 to disable")
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")

    def _validate_penalties(self) -> None:
        _require(_is_real(self.repetition_penalty)
                 and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
                 "repetition_penalty", self.repetition_penalty,
                 f"a number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -2 <= value <= 2, name, value, "in [-2, 2]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop or ()), default=0)

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a parsed generation_config.json; explicit `overrides` win.

        Reads temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as
        max_tokens). An explicit `do_sample: false` makes the default greedy (temperature 0).
        Eos ids are not sampling parameters: see `eos_token_ids_from_generation_config`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"SamplingParams has no field(s) {unknown}")
        defaults: dict[str, Any] = {
            key: gen[key] for key in _GENERATION_CONFIG_KEYS if gen.get(key) is not None
        }
        if gen.get("max_new_tokens") is not None:
            defaults["max_tokens"] = gen["max_new_tokens"]
        if gen.get("do_sample") is False:
            defaults["temperature"] = 0.0
        return cls(**{**defaults, **overrides})


def eos_token_ids_from_generation_config(gen: dict[str, Any]) -> tuple[int, ...]:
    """The eos ids of a generation_config.json (`eos_token_id` is an int or a list), in order."""
    eos = gen.get("eos_token_id")
    if eos is None:
        return ()
    ids = [eos] if isinstance(eos, int) else list(eos)
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"generation_config eos_token_id must hold ints >= 0, got {eos!r}")
    return tuple(dict.fromkeys(ids))


def _normalise_stop(stop: tuple[str, ...] | list[str] | str | None) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in strings:
        # An empty stop string would match at every position and end every request at once.
        _require(isinstance(s, str) and s != "", "stop", stop, "non-empty strings")
    return strings


def _normalise_token_ids(ids: tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    token_ids = tuple(ids or ())
    for i in token_ids:
        _require(_is_int(i) and i >= 0, "stop_token_ids", ids, "integers >= 0")
    return token_ids


def _is_int(value: object) -> bool:
    # bool is an int subclass; `top_k=True` is a caller bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")
