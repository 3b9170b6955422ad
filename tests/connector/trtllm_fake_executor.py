"""A fake TensorRT-LLM 1.2 PyTorch executor that drives a KV cache connector as upstream does.

Written from a reading of upstream's source (no code copied; ids are stored copies readable with
the ``read_file`` tool, commits where known). Each behaviour below names the file and symbol.

Construction (``py_executor_creator.py`` 1083207948 ``create_py_executor``): the connector module
is imported by name from ``kv_connector_config``; on every tensor-parallel rank a worker half is
built with ``(llm_args)`` only, and on rank 0 the scheduler half too, both at once on a two-thread
pool. Then (``py_executor.py`` 736889464 ``_maybe_init_kv_connector_manager``) each rank's worker
gets ``register_kv_caches(get_unique_primary_pool())``: its own pool holding its head shard.
``tensorrt_llm._utils.mpi_rank()`` (what the connector reads its rank from) is a fake module here
whose value is the simulated rank of the call in progress (a context variable), and the
``TRTLLM_PRFAAS_*`` environment given to the executor is set while its halves are built.

One iteration (``py_executor.py`` 736889464 ``_executor_loop`` / ``_executor_loop_overlap``):
  schedule: active requests that are not parked or saving, up to ``max_batch_size``; context
      requests take a chunk of up to ``chunk_size`` tokens whose end is block-aligned unless it
      is the prompt's end (TensorRT-LLM's plain chunking; no "last token alone" rule).
  ``prepare_resources`` (``resource_manager.py`` 3501434665 ``KVCacheManager.prepare_resources``):
      a context request's first chunk adds its sequence, unless it has finished an async load
      (``kv_cache_connector.py`` 3277953 ``should_add_sequence``). Adding follows
      ``kvCacheManager.cpp`` 126178160 ``WindowBlockManager::addSequence``/``loadOrAllocateBlocks``:
      the prompt minus its last token is cut into blocks and matched against the reuse tree
      (``BlockManager`` below: full blocks, then one partial match with partial reuse on), then
      ``get_num_new_matched_tokens(request, num_computed_tokens=matched)`` runs on the leader and
      its result is broadcast; ``setPrepopulatedPromptLen(matched + n)`` enforces
      ``prepopulatedPromptLen < promptLen`` (``llmRequest.h`` 786144818; raised here as
      ``TllmCheckError``, which kills the loop as the unwrapped C++ exception does) and moves the
      chunk start. ``update_state_after_alloc(request, block_ids)`` runs on rank 0 only. A
      generation request adds a token (a new block when a block fills). Then the scheduler output
      is built (``KvCacheConnectorSchedulerOutputManager``): new async loads are skipped; context
      requests report ``computed_position`` = context position, minus this iteration's external
      load; generation requests ``len(tokens) - 1`` and one token.
  ``_kv_connector_start_batch``: new async loads leave the batch (parked), the leader's
      ``build_connector_meta`` is broadcast (a pickle round trip per rank) and bound on every
      rank, then ``start_load_kv(stream)``.
  ``_forward_step`` (batch not empty): per rank and layer ``wait_for_layer_load(i, stream)``,
      the KV writes, ``save_kv_layer(i, stream)``; then ``wait_for_save(stream)``. An exception
      here fails every active request (``_handle_errors``); with the overlap scheduler the loop
      then dies too (``assert sample_state is not None`` after the failed forward). An exception
      from any other connector call kills the loop.
  sampling and responses: with the overlap scheduler (the default of ``TorchLlmArgs``; the
      project's ``model.yaml`` leaves it on) a batch's tokens reach the host one iteration later,
      so a finished request is found (``_handle_responses``) and terminated after the next
      forward, in which it ran once more. ``_do_terminate_request``: ``request_finished(request,
      get_cache_indices(request))`` on the leader, broadcast; True pins its blocks. Blocks with
      computed KV are stored for reuse (``update_resources``/``store_context_blocks``) and stay
      cached after release until a new allocation evicts them.
  ``_kv_connector_terminate_requests`` (``kv_cache_connector.py`` 3277953
      ``KvCacheConnectorManager.get_finished``): each rank passes its new async ids in once,
      ``extract_by_id`` raises KeyError for an id never passed in, results are allgathered and
      only the intersection acts: loads return the request to the context state, saves unpin.

Requests: connectors see only fields the 1.2 ``LlmRequest`` binding exposes (``bindings.cpp``
385050988); ``get_num_new_matched_tokens`` gets the C++ view (no ``py_*`` attributes; see
``mark_ready_requests`` in 00fdcbf: "the req we get from the C++ call is different"). There is
no ``connector_params``, no ``py_disaggregated_params`` (absent in 1.2: TRTLLM_AUDIT.md 3a).
Generation-only requests raise as ``KvCacheConnectorManager.get_num_new_matched_tokens`` does.
Only upstream's hooks are called: no ``register_recurrent_states``, ``get_failed_loads``,
``cancel_*``; ``llm_args`` has no ``connector_options``.

Versions: the stored copies span several upstream versions, some without a commit. Where they
differ the fake keeps what they share: a saving request's blocks stay allocated until every rank
reports the save (older loops keep the request and free it then; newer ones pin its blocks with
``store_blocks_for_reuse(request, True)`` and ``unpin_blocks_by_id``), and the prepopulated
check is the one both ``llmRequest.h`` (786144818) and the older ``addSequence`` (1277673704,
"There must be at least one uncomputed token in the prompt!") enforce.

Not modelled: eviction order beyond "never-stored blocks first, then least recently freed",
token budgets across requests, beam > 1, speculative decoding, pipeline parallelism, and a
connector thread calling ``mpi_rank()`` (it raises: the fake cannot tell which simulated rank a
background thread serves).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import importlib
import itertools
import os
import pickle
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace
from typing import Any

import torch

from tests.connector.fake_device import CpuDevice, Device

__all__ = [
    "PRFAAS_CONNECTOR",
    "ConnectorSpec",
    "FakeExecutor",
    "FakeModel",
    "RequestData",
    "SchedulerOutput",
    "TllmCheckError",
    "drive",
    "kv_rows",
    "next_token",
]

_RANK: contextvars.ContextVar[int] = contextvars.ContextVar("fake_mpi_rank")


class TllmCheckError(RuntimeError):
    """A failed ``TLLM_CHECK`` in TensorRT-LLM's C++ (raised out of the executor loop)."""


@dataclass(frozen=True)
class ConnectorSpec:
    """``kv_connector_config``: where the executor finds the two halves."""

    module: str
    scheduler_class: str
    worker_class: str


PRFAAS_CONNECTOR = ConnectorSpec(
    "trtllm_prfaas.connector.prfaas", "PrfaasConnectorScheduler", "PrfaasConnectorWorker"
)


@dataclass(frozen=True)
class FakeModel:
    """A dense (attention-only) model: every decoder layer has KV in the pool."""

    name: str = "fake-dense-model"
    num_layers: int = 4
    num_kv_heads: int = 4
    head_dim: int = 8
    tokens_per_block: int = 16
    num_blocks: int = 64
    dtype: torch.dtype = torch.float16
    vocab_size: int = 1000

    def pool_shape(self, tp_size: int) -> tuple[int, int, int, int]:
        """One rank's ``[num_blocks, num_layers, kv_factor, heads/tp * tokens_per_block * dim]``."""
        row = self.num_kv_heads // tp_size * self.tokens_per_block * self.head_dim
        return (self.num_blocks, self.num_layers, 2, row)


def _digest(tokens: list[int], *salt: int) -> int:
    data = torch.tensor(list(tokens) + list(salt), dtype=torch.int64).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def kv_rows(model: FakeModel, tokens: list[int], pos: int, layer: int) -> torch.Tensor:
    """``(2, num_kv_heads, head_dim)``: K and V of token ``pos`` in ``layer``, all heads (a
    function of the prefix ``tokens[: pos + 1]``, so equal prefixes give equal KV)."""
    gen = torch.Generator().manual_seed(_digest(tokens[: pos + 1], layer) & 0x7FFF_FFFF)
    return torch.randn((2, model.num_kv_heads, model.head_dim), generator=gen).to(model.dtype)


def shard(model: FakeModel, rows: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``rank``'s heads of ``rows`` (heads split evenly across tensor-parallel ranks)."""
    per_rank = model.num_kv_heads // tp_size
    return rows[:, rank * per_rank : (rank + 1) * per_rank, :]


def next_token(model: FakeModel, tokens: list[int]) -> int:
    """The fake model's greedy next token after ``tokens``."""
    return _digest(tokens, -1) % model.vocab_size


# ---------------------------------------------------------------- upstream's connector types
@dataclass
class RequestData:
    """``kv_cache_connector.RequestData`` (same fields)."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclass
class SchedulerOutput:
    """``kv_cache_connector.SchedulerOutput`` (same fields)."""

    new_requests: list[RequestData] = field(default_factory=list)
    cached_requests: list[RequestData] = field(default_factory=list)


class State(Enum):
    """The ``LlmRequestState`` values this loop uses."""

    CONTEXT_INIT = "context_init"
    GENERATION_IN_PROGRESS = "generation_in_progress"
    GENERATION_COMPLETE = "generation_complete"
    LOADING = "disagg_generation_trans_in_progress"  # parked by an async load
    SAVING = "disagg_context_trans_in_progress"  # finished, blocks pinned by an async save


class CppRequestView:
    """The C++ ``LlmRequest`` as the binding exposes it: what ``get_num_new_matched_tokens``
    gets. No ``py_*`` attribute, no project-only field."""

    __slots__ = ("_req",)

    def __init__(self, req: FakeLlmRequest) -> None:
        self._req = req

    request_id = property(lambda self: self._req.request_id)
    prompt_len = property(lambda self: self._req.prompt_len)
    orig_prompt_len = property(lambda self: self._req.prompt_len)
    max_new_tokens = property(lambda self: self._req.max_new_tokens)
    context_current_position = property(lambda self: self._req.context_current_position)
    prepopulated_prompt_len = property(lambda self: self._req.prepopulated_prompt_len)
    is_generation_only_request = property(lambda self: self._req.is_generation_only_request)
    is_context_only_request = property(lambda self: False)
    is_dummy_request = property(lambda self: False)
    cache_salt_id = property(lambda self: None)

    def get_tokens(self, beam: int | None = None) -> list[int]:
        tokens = list(self._req.tokens)
        return tokens if beam is not None else [tokens]


class FakeLlmRequest:
    """The Python ``LlmRequest`` (binding fields plus ``py_request_id`` and friends): what
    ``update_state_after_alloc`` and ``request_finished`` get."""

    __slots__ = (
        "context_chunk_size",
        "context_current_position",
        "is_generation_only_request",
        "max_new_tokens",
        "prepopulated_prompt_len",
        "prompt_len",
        "request_id",
        "state",
        "tokens",
    )  # fmt: skip

    def __init__(self, rid: int, prompt: list[int], max_new: int, gen_only: bool) -> None:
        self.request_id, self.tokens, self.prompt_len = rid, list(prompt), len(prompt)
        self.max_new_tokens, self.is_generation_only_request = max_new, gen_only
        self.context_current_position = self.prepopulated_prompt_len = self.context_chunk_size = 0
        self.state = State.CONTEXT_INIT

    py_request_id = property(lambda self: self.request_id)
    py_prompt_len = property(lambda self: self.prompt_len)
    py_orig_prompt_len = property(lambda self: self.prompt_len)
    py_max_new_tokens = property(lambda self: self.max_new_tokens)
    orig_prompt_len = py_orig_prompt_len
    is_context_only_request = property(lambda self: False)
    is_dummy_request = property(lambda self: False)
    cache_salt_id = property(lambda self: None)
    is_first_context_chunk = property(
        lambda self: self.context_current_position == self.prepopulated_prompt_len
    )
    context_remaining_length = property(
        lambda self: self.prompt_len - self.context_current_position
    )

    def get_tokens(self, beam: int | None = None) -> list[int]:
        return list(self.tokens) if beam is not None else [list(self.tokens)]


# ------------------------------------------------------------------------ the block manager
class BlockManager:
    """One rank's block bookkeeping (identical on every rank: allocation is deterministic).

    Reuse (``kvCacheManager.cpp`` 126178160 ``loadOrAllocateBlocks``, ``storeBlocks``,
    ``storeContextBlocks``): a stored block is keyed by (the tokens before it, its own tokens);
    matching walks the prompt minus its last token block by block, a full match continues, and
    with partial reuse (``enable_partial_reuse``, on by default in ``KvCacheConfig``) the best
    common prefix with a stored block ends the match: a block in use or with children is copied
    into a private block (``copy_on_partial_reuse``), a free leaf leaves the tree and is reused.
    Stored blocks stay matchable after release until an allocation evicts them (never-stored
    free blocks go first)."""

    def __init__(
        self, num_blocks: int, tpb: int, partial_reuse: bool, copy: Callable[[int, int, int], None]
    ) -> None:
        self.tpb, self.partial_reuse, self._copy = tpb, partial_reuse, copy
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.children: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
        self.key_of: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.blocks: dict[int, list[int]] = {}  # request id -> its block ids, in order
        self.pinned: dict[int, list[int]] = {}  # request id -> blocks pinned by a save

    def num_free(self) -> int:
        return len(self.free)

    def cached_block(self, tokens: list[int]) -> int | None:
        """The stored block whose key ends exactly at the end of ``tokens`` (None if absent)."""
        start = (len(tokens) - 1) // self.tpb * self.tpb
        return self.children.get(tuple(tokens[:start]), {}).get(tuple(tokens[start:]))

    def add_sequence(self, rid: int, tokens: list[int], input_len: int) -> int:
        """Allocate ``ceil(input_len / tpb)`` blocks, reusing what matches of
        ``tokens[: input_len - 1]``; return the matched token count."""
        limit, matched, num_matched = input_len - 1, [], 0
        for start in range(0, limit, self.tpb):
            parent, own = tuple(tokens[:start]), tuple(tokens[start : min(start + self.tpb, limit)])
            stored = self.children.get(parent, {})
            block = stored.get(own) if len(own) == self.tpb else None
            if block is not None:
                self._claim(block)
                matched.append(block)
                num_matched += self.tpb
                continue
            best = max(((_common(own, key), b) for key, b in stored.items()), default=(0, -1))
            if self.partial_reuse and best[0] > 0:
                matched.append(self._reuse_partly(best[1], best[0]))
                num_matched += best[0]
            break
        fresh = [self._allocate() for _ in range(-(-input_len // self.tpb) - len(matched))]
        self.blocks[rid] = matched + fresh
        return num_matched

    def _reuse_partly(self, block: int, num_tokens: int) -> int:
        parent, own = self.key_of[block]
        if self.refs[block] == 0 and not self.children.get(parent + own):
            self._forget(block)  # a free leaf: out of the tree, reused privately
            self._claim(block)
            return block
        self._claim(block)  # in use or has children: copy its matched tokens
        copy = self._allocate()
        self._copy(block, copy, num_tokens)
        self._unref(block)
        return copy

    def add_token(self, rid: int, num_tokens: int) -> None:
        """The sequence now holds ``num_tokens`` tokens: a new block when the last one is full."""
        if num_tokens > len(self.blocks[rid]) * self.tpb:
            self.blocks[rid].append(self._allocate())

    def store(self, rid: int, tokens: list[int], num_with_kv: int, partial: bool) -> None:
        """Make the request's blocks holding computed KV matchable: full ones, and with
        ``partial`` (a released request) the last partly filled one; first writer wins."""
        for b, block in enumerate(self.blocks.get(rid, [])):
            start, end = b * self.tpb, min((b + 1) * self.tpb, num_with_kv)
            if end <= start or (end - start < self.tpb and not partial):
                return
            parent, own = tuple(tokens[:start]), tuple(tokens[start:end])
            old = self.key_of.get(block)
            if old is not None and (old[0] != parent or own[: len(old[1])] != old[1]):
                continue  # the block holds another prefix (a shared or stale key)
            if old is not None:
                self._forget(block)  # grown since it was stored: re-key it
            self.children.setdefault(parent, {}).setdefault(own, block)
            if self.children[parent][own] == block:
                self.key_of[block] = (parent, own)

    def release(self, rid: int, pin: bool) -> None:
        blocks = self.blocks.pop(rid)
        if pin:
            self.pinned[rid] = blocks
            return
        for block in blocks:
            self._unref(block)

    def unpin(self, rid: int) -> None:
        for block in self.pinned.pop(rid):
            self._unref(block)

    def _claim(self, block: int) -> None:
        self.refs[block] += 1
        self.free.pop(block, None)

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None  # most recently freed last

    def _forget(self, block: int) -> None:
        parent, own = self.key_of.pop(block)
        del self.children[parent][own]

    def _allocate(self) -> int:
        uncached = next((b for b in self.free if b not in self.key_of), None)
        block = uncached if uncached is not None else next(iter(self.free), None)
        if block is None:
            raise TllmCheckError("Can't allocate new blocks. No free blocks left.")
        if block in self.key_of:
            self._forget(block)  # evicted from the reuse tree
        self._claim(block)
        return block


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --------------------------------------------------------------------------------- the ranks
@dataclass
class _Async:
    """``AsyncRequests``: ids being saved / loaded."""

    saving: dict[int, FakeLlmRequest] = field(default_factory=dict)
    loading: dict[int, FakeLlmRequest] = field(default_factory=dict)

    def move_to(self, other: _Async) -> None:
        other.saving.update(self.saving)
        other.loading.update(self.loading)
        self.saving, self.loading = {}, {}

    def extract(self, saving: list[int], loading: list[int]) -> _Async:
        """KeyError for an id that is not here (upstream ``extract_by_id``)."""
        out = _Async()
        for rid in saving:
            out.saving[rid] = self.saving.pop(rid)
        for rid in loading:
            out.loading[rid] = self.loading.pop(rid)
        return out


@dataclass
class Rank:
    """One tensor-parallel rank: its worker half, pool, stream and connector-manager state."""

    rank: int
    worker: Any
    pool: torch.Tensor
    stream: Any
    log: list[str] = field(default_factory=list)  # the connector calls made on this rank
    new: _Async = field(default_factory=_Async)  # not yet passed to get_finished
    pending: _Async = field(default_factory=_Async)  # passed in, not yet returned
    local_done: _Async = field(default_factory=_Async)  # returned here, not yet by all ranks


@contextlib.contextmanager
def _as_rank(rank: int) -> Iterator[None]:
    token = _RANK.set(rank)
    try:
        yield
    finally:
        _RANK.reset(token)


def _mpi_rank() -> int:
    try:
        return _RANK.get()
    except LookupError:
        raise RuntimeError(
            "fake tensorrt_llm._utils.mpi_rank() called outside a simulated rank's call (from a "
            "connector thread?): read the rank when the half is constructed"
        ) from None


_installed: list[int] = [0]  # how many live executors need the fake tensorrt_llm modules


def _install_fake_tensorrt_llm(world_size: int) -> None:
    if _installed[0] == 0:
        if "tensorrt_llm" in sys.modules:
            raise RuntimeError("a real tensorrt_llm is loaded: the fake executor cannot run")
        package, utils = types.ModuleType("tensorrt_llm"), types.ModuleType("tensorrt_llm._utils")
        package.__path__ = []  # a package, so `import tensorrt_llm._utils` works
        for module in (package, utils):
            module.mpi_rank = _mpi_rank  # type: ignore[attr-defined]
            module.mpi_world_size = lambda: world_size  # type: ignore[attr-defined]
        package._utils = utils  # type: ignore[attr-defined]
        sys.modules["tensorrt_llm"], sys.modules["tensorrt_llm._utils"] = package, utils
    _installed[0] += 1


def _uninstall_fake_tensorrt_llm() -> None:
    _installed[0] -= 1
    if _installed[0] == 0:
        sys.modules.pop("tensorrt_llm._utils", None)
        sys.modules.pop("tensorrt_llm", None)


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _broadcast(obj: Any) -> Any:
    """``mpi_broadcast``: what every rank receives is a pickle round trip of the root's object."""
    return pickle.loads(pickle.dumps(obj))


@dataclass
class Result:
    """What the client of one request sees."""

    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    is_finished: bool = False


def _llm_args(
    model: FakeModel, tp_size: int, spec: ConnectorSpec, overlap: bool, partial_reuse: bool
) -> Any:
    """What ``TorchLlmArgs`` carries that a connector may read (no ``connector_options``)."""
    return SimpleNamespace(
        model=model.name,
        backend="pytorch",
        tensor_parallel_size=tp_size,
        pipeline_parallel_size=1,
        max_beam_width=1,
        enable_chunked_prefill=True,
        disable_overlap_scheduler=not overlap,
        cuda_graph_config=None,
        kv_cache_config=SimpleNamespace(
            tokens_per_block=model.tokens_per_block,
            dtype="auto",
            enable_block_reuse=True,
            enable_partial_reuse=partial_reuse,
            copy_on_partial_reuse=True,
        ),
        scheduler_config=SimpleNamespace(capacity_scheduler_policy="GUARANTEED_NO_EVICT"),
        kv_connector_config=SimpleNamespace(
            connector_module=spec.module,
            connector_scheduler_class=spec.scheduler_class,
            connector_worker_class=spec.worker_class,
        ),
    )


def _build_in_rank(rank: int, cls: type, llm_args: Any) -> Any:
    with _as_rank(rank):
        return cls(llm_args)


class FakeExecutor:
    """One deployment (one ``LLM``): ``tp_size`` ranks driven in lockstep, one KV block layout.

    A context manager; ``close()`` removes the fake ``tensorrt_llm`` modules once the last
    executor closes. The connector's own process-wide state is the test's to close."""

    def __init__(
        self,
        model: FakeModel | None = None,
        *,
        tp_size: int = 1,
        chunk_size: int = 32,
        env: Mapping[str, str] | None = None,
        device: Device | None = None,
        connector: ConnectorSpec = PRFAAS_CONNECTOR,
        overlap_scheduler: bool = True,
        partial_reuse: bool = True,
        max_batch_size: int = 8,
    ) -> None:
        self.model = model = model or FakeModel()
        if model.num_kv_heads % tp_size or chunk_size % model.tokens_per_block:
            raise ValueError("heads must split evenly over ranks; chunk_size must be whole blocks")
        self.tp_size, self.chunk_size, self.overlap = tp_size, chunk_size, overlap_scheduler
        self.max_batch_size, self.device = max_batch_size, device or CpuDevice()
        self.llm_args = _llm_args(model, tp_size, connector, overlap_scheduler, partial_reuse)
        self.blocks = BlockManager(
            model.num_blocks, model.tokens_per_block, partial_reuse, self._copy_tokens
        )
        self._init_state()
        _install_fake_tensorrt_llm(tp_size)
        self._closed = False
        try:
            with _environment(env or {}):
                self.scheduler, workers = self._build_halves(connector)
            self.ranks = [self._start_rank(rank, worker) for rank, worker in enumerate(workers)]
        except BaseException:
            self.close()
            raise

    def _init_state(self) -> None:
        self._ids = itertools.count(1)
        self.waiting: list[FakeLlmRequest] = []
        self.active: list[FakeLlmRequest] = []
        self.requests: dict[int, FakeLlmRequest] = {}
        self.results: dict[int, Result] = {}
        self.claims: dict[int, tuple[int, int, bool]] = {}  # rid -> (device match, claimed, async)
        self.computed: dict[int, list[tuple[int, int]]] = {}  # rid -> positions it computed
        self.loaded_snapshots: dict[int, list[torch.Tensor]] = {}  # rid -> per rank blocks
        self.parked_at: dict[int, float] = {}  # rid -> when its async load parked it (live)
        self.ever_parked: set[int] = set()  # requests an async load parked at some point
        self.ever_pinned: set[int] = set()  # requests whose save pinned their blocks
        self.errors: list[str] = []
        self.iterations: list[list[list[str]]] = []  # per iteration, per rank: connector calls
        self.dead: BaseException | None = None
        self._finished_loading: set[int] = set()
        self._external_loads: dict[int, int] = {}
        self._reported: dict[int, tuple[int, int]] = {}
        self._seq_tokens: dict[int, int] = {}
        self._kv_len: dict[int, int] = {}
        self._pending_token: dict[int, int] = {}
        self._previous: list[tuple[FakeLlmRequest, int | None]] | None = None
        self._previous_batch: list[FakeLlmRequest] = []

    def _build_halves(self, spec: ConnectorSpec) -> tuple[Any, list[Any]]:
        module = importlib.import_module(spec.module)
        worker_cls, scheduler_cls = (
            getattr(module, spec.worker_class),
            getattr(module, spec.scheduler_class),
        )
        workers, scheduler = [], None
        for rank in range(self.tp_size):
            with ThreadPoolExecutor(max_workers=2) as pool:
                args = copy.deepcopy(self.llm_args)
                worker = pool.submit(_build_in_rank, rank, worker_cls, args)
                if rank == 0:
                    scheduler = pool.submit(_build_in_rank, 0, scheduler_cls, args).result()
                workers.append(worker.result())
        return scheduler, workers

    def _start_rank(self, rank: int, worker: Any) -> Rank:
        pool = self.device.make_pool(self.model.pool_shape(self.tp_size), self.model.dtype)
        state = Rank(rank, worker, pool, self.device.make_stream())
        self._call(state, "register_kv_caches", pool)
        return state

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _uninstall_fake_tensorrt_llm()

    def __enter__(self) -> FakeExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- client side
    def add_request(
        self, prompt: list[int], max_tokens: int, *, generation_only: bool = False
    ) -> int:
        """Enqueue ``prompt`` for ``max_tokens`` new tokens (``LLM.generate_async``)."""
        rid = next(self._ids)
        req = FakeLlmRequest(rid, prompt, max_tokens, generation_only)
        self.requests[rid], self.results[rid] = req, Result()
        self.waiting.append(req)
        return rid

    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self.blocks.pinned or self._previous)

    def parked(self) -> list[int]:
        return [r.request_id for r in self.active if r.state is State.LOADING]

    def leak_report(self) -> list[str]:
        problems = [f"request {r.request_id} still {r.state.value}" for r in self.active]
        problems += [f"request {r.request_id} still waiting" for r in self.waiting]
        problems += [f"blocks pinned for request {rid}" for rid in self.blocks.pinned]
        problems += [f"block {b} still referenced" for b, n in enumerate(self.blocks.refs) if n]
        for r in self.ranks:
            for name, group in (("new", r.new), ("pending", r.pending), ("done", r.local_done)):
                if group.saving or group.loading:
                    problems.append(f"rank {r.rank} {name} async: {group}")
        return problems

    # --------------------------------------------------------------------------- iteration
    def step(self) -> None:
        """One pass of the executor loop on every rank. Raises (and stays dead) where the
        upstream loop would die."""
        if self.dead is not None:
            raise RuntimeError("the executor loop died earlier") from self.dead
        marks = [len(r.log) for r in self.ranks]
        try:
            self._iteration()
        except BaseException as exc:
            self.dead = exc
            raise
        finally:
            self.iterations.append([r.log[m:] for r, m in zip(self.ranks, marks, strict=True)])

    def _iteration(self) -> None:
        batch = self._schedule()
        if batch:
            self._prepare_resources(batch)
            batch = self._start_batch(batch)
        if batch and self._forward(batch):
            if self.overlap:
                if self._previous is not None:
                    self._apply_samples(self._previous)
                samples = self._sample(batch)
                self._update_states(batch)
                if self._previous is not None:
                    self._process(self._previous_batch)
                self._previous, self._previous_batch = samples, batch
            else:
                samples = self._sample(batch)
                self._update_states(batch)
                self._apply_samples(samples)
                self._process(batch)
        elif self._previous is not None and not self.active:
            self._previous, self._previous_batch = None, []
        self._get_finished()

    # ---- scheduling (GUARANTEED_NO_EVICT capacity, plain chunking) ----
    def _blocks_to_completion(self, req: FakeLlmRequest) -> int:
        total = -(-(req.prompt_len + req.max_new_tokens) // self.model.tokens_per_block)
        return total - len(self.blocks.blocks.get(req.request_id, []))

    def _schedule(self) -> list[FakeLlmRequest]:
        while self.waiting and len(self.active) < self.max_batch_size:
            reserved = sum(self._blocks_to_completion(r) for r in self.active)
            if self.blocks.num_free() - reserved < self._blocks_to_completion(self.waiting[0]):
                break
            self.active.append(self.waiting.pop(0))
        runnable = (State.CONTEXT_INIT, State.GENERATION_IN_PROGRESS)
        batch = [r for r in self.active if r.state in runnable][: self.max_batch_size]
        for req in batch:
            if req.state is State.CONTEXT_INIT:
                req.context_chunk_size = self._chunk(req.context_current_position, req.prompt_len)
        return batch

    def _chunk(self, begin: int, length: int) -> int:
        """Tokens of the next context chunk: up to ``chunk_size``, ending on a block boundary
        unless it ends the prompt."""
        end = min(begin + self.chunk_size, length)
        if end < length:
            end = max(end // self.model.tokens_per_block * self.model.tokens_per_block, begin + 1)
        return end - begin

    # ---- calls into the connector ----
    def _call(self, rank: Rank, name: str, *args: Any) -> Any:
        """``rank``'s worker half: ``name(*args)``, logged, with ``mpi_rank()`` = its rank."""
        rank.log.append(name)
        with _as_rank(rank.rank):
            return getattr(rank.worker, name)(*args)

    def _leader(self, name: str, *args: Any) -> Any:
        """``_run_on_leader``: the scheduler half on rank 0, its result broadcast."""
        self.ranks[0].log.append(name)
        with _as_rank(0):
            result = getattr(self.scheduler, name)(*args)
        return _broadcast(result)

    # ---- prepare_resources ----
    def _prepare_resources(self, batch: list[FakeLlmRequest]) -> None:
        for req in batch:
            rid = req.request_id
            if req.state is State.GENERATION_IN_PROGRESS:
                self._seq_tokens[rid] += 1
                self.blocks.add_token(rid, self._seq_tokens[rid])
            elif (
                req.is_first_context_chunk
                and rid not in self._finished_loading
                and rid not in self.blocks.blocks
            ):
                self._add_sequence(req)

    def _add_sequence(self, req: FakeLlmRequest) -> None:
        rid = req.request_id
        matched = self.blocks.add_sequence(rid, req.tokens, req.prompt_len)
        self._seq_tokens[rid] = req.prompt_len
        if req.is_generation_only_request:
            raise RuntimeError("Connector API is not supported for generation-only requests!")
        num_tokens, load_async = self._leader(
            "get_num_new_matched_tokens", CppRequestView(req), matched
        )
        if num_tokens == 0 and load_async:
            raise RuntimeError("load_kv_async must be False when num_tokens is 0!")
        if load_async:
            for rank in self.ranks:
                rank.new.loading[rid] = req
        self._external_loads[rid] = num_tokens
        self.claims[rid] = (matched, num_tokens, bool(load_async))
        self._set_prepopulated(req, matched + num_tokens)
        self.ranks[0].log.append("update_state_after_alloc")
        with _as_rank(0):
            self.scheduler.update_state_after_alloc(req, list(self.blocks.blocks[rid]))

    def _set_prepopulated(self, req: FakeLlmRequest, prepopulated: int) -> None:
        """``LlmRequest::setPrepopulatedPromptLen``: the check, then the chunk moves."""
        if not prepopulated < req.prompt_len:
            raise TllmCheckError(
                f"Invalid state: prepopulatedPromptLen ({prepopulated}) >= promptLen "
                f"({req.prompt_len}) for request {req.request_id}"
            )
        req.prepopulated_prompt_len = prepopulated
        if prepopulated > 0:
            tpb, chunk = self.model.tokens_per_block, req.context_chunk_size
            if prepopulated + chunk < req.prompt_len:
                chunk = (prepopulated + chunk) // tpb * tpb - prepopulated
            req.context_current_position = prepopulated
            req.context_chunk_size = min(chunk, req.prompt_len - prepopulated)

    # ---- _kv_connector_start_batch ----
    def _start_batch(self, batch: list[FakeLlmRequest]) -> list[FakeLlmRequest]:
        output = self._scheduler_output(batch)
        kept = []
        for req in batch:
            if req.request_id in self.ranks[0].new.loading and req.state is State.CONTEXT_INIT:
                req.state = State.LOADING  # take_scheduled_requests_pending_load
                self.parked_at[req.request_id] = time.monotonic()
                self.ever_parked.add(req.request_id)
            else:
                kept.append(req)
        meta = self._leader("build_connector_meta", output)
        for rank in self.ranks:
            self._call(rank, "bind_connector_meta", _broadcast(meta))
            self._call(rank, "start_load_kv", rank.stream)
        return kept

    def _scheduler_output(self, batch: list[FakeLlmRequest]) -> SchedulerOutput:
        out = SchedulerOutput()
        for req in batch:
            rid = req.request_id
            if req.state is State.CONTEXT_INIT:
                if rid in self.ranks[0].new.loading:
                    continue
                is_new = rid not in self._reported
                data = self._request_data(req)
                data.computed_position -= self._external_loads.get(rid, 0)
                (out.new_requests if is_new else out.cached_requests).append(data)
            else:
                out.cached_requests.append(self._request_data(req))
        self._external_loads = {}
        return out

    def _request_data(self, req: FakeLlmRequest) -> RequestData:
        rid, tokens = req.request_id, list(req.tokens)
        block_ids = self.blocks.blocks[rid]
        num_tokens, num_blocks = self._reported.get(rid, (0, 0))
        self._reported[rid] = (len(tokens), len(block_ids))
        if req.state is State.CONTEXT_INIT:
            computed = req.context_current_position
            scheduled = min(req.context_remaining_length, req.context_chunk_size)
        else:
            computed, scheduled = len(tokens) - 1, 1
        return RequestData(
            rid, tokens[num_tokens:], list(block_ids[num_blocks:]), computed, scheduled
        )

    # ---- _forward_step ----
    def _positions(self, req: FakeLlmRequest) -> tuple[list[int], range]:
        """(the tokens the device sees, the positions this iteration computes)."""
        pending = self._pending_token.get(req.request_id)
        tokens = req.tokens + ([] if pending is None else [pending])
        if req.state is State.CONTEXT_INIT:
            begin = req.context_current_position
            return tokens, range(begin, begin + req.context_chunk_size)
        return tokens, range(len(tokens) - 1, len(tokens))

    def _forward(self, batch: list[FakeLlmRequest]) -> bool:
        """Every rank's forward pass with the layer hooks; False when it failed (and every
        active request with it)."""
        work = [(req, *self._positions(req)) for req in batch]
        for req, _, positions in work:
            self.computed.setdefault(req.request_id, []).append((positions.start, positions.stop))
        rows: dict[tuple[int, int, int], torch.Tensor] = {}
        try:
            for rank in self.ranks:
                for layer in range(self.model.num_layers):
                    self._call(rank, "wait_for_layer_load", layer, rank.stream)
                    for req, tokens, positions in work:
                        self._write(rank, req, tokens, positions, layer, rows)
                    self._call(rank, "save_kv_layer", layer, rank.stream)
                self._call(rank, "wait_for_save", rank.stream)
            return True
        except Exception as exc:  # _forward_step: fail every active request
            self.errors.append(f"forward: {exc!r}")
            self._handle_errors(f"forward: {exc!r}")
            if self.overlap:  # _executor_loop_overlap: `assert sample_state is not None`
                raise RuntimeError("Sampling failed (overlap loop after a failed forward)") from exc
            return False

    def _write(
        self,
        rank: Rank,
        req: FakeLlmRequest,
        tokens: list[int],
        positions: range,
        layer: int,
        rows: dict[tuple[int, int, int], torch.Tensor],
    ) -> None:
        tpb, block_ids = self.model.tokens_per_block, self.blocks.blocks[req.request_id]
        for pos in positions:
            key = (req.request_id, pos, layer)
            if key not in rows:
                rows[key] = kv_rows(self.model, tokens, pos, layer)
            part = shard(self.model, rows[key], rank.rank, self.tp_size)
            block = block_ids[pos // tpb]
            self.device.write_token_rows(rank.pool, block, layer, pos % tpb, part, rank.stream)

    def _copy_tokens(self, source: int, target: int, num_tokens: int) -> None:
        """The block manager's device copy of a partly matched block's first tokens."""
        model = self.model
        heads = model.num_kv_heads // self.tp_size
        for rank in self.ranks:
            for layer in range(model.num_layers):
                data = self.device.read_block(rank.pool, source, layer)
                rows = data.view(2, heads, model.tokens_per_block, model.head_dim)
                for pos in range(num_tokens):
                    self.device.write_token_rows(
                        rank.pool, target, layer, pos, rows[:, :, pos, :], rank.stream
                    )

    def _handle_errors(self, message: str) -> None:
        failed, self.active = list(self.active), []
        for req in failed:
            req.state = State.GENERATION_COMPLETE
            self.results[req.request_id].error = message
            self.results[req.request_id].is_finished = True
        for req in failed:
            self._terminate(req)

    # ---- sampling, request states, responses ----
    def _sample(self, batch: list[FakeLlmRequest]) -> list[tuple[FakeLlmRequest, int | None]]:
        samples: list[tuple[FakeLlmRequest, int | None]] = []
        for req in batch:
            tokens, positions = self._positions(req)
            done = req.state is not State.CONTEXT_INIT or positions.stop == req.prompt_len
            token = next_token(self.model, tokens) if done else None
            if token is not None and self.overlap:
                self._pending_token[req.request_id] = token
            samples.append((req, token))
        return samples

    def _update_states(self, batch: list[FakeLlmRequest]) -> None:
        """``_update_request_states_tp``: context chunks advance; a finished context starts
        generating. Also records how far each request's KV reaches."""
        for req in batch:
            _, positions = self._positions(req)
            self._kv_len[req.request_id] = positions.stop
            if req.state is State.CONTEXT_INIT:
                req.context_current_position = positions.stop
                if req.context_current_position == req.prompt_len:
                    req.state = State.GENERATION_IN_PROGRESS

    def _apply_samples(self, samples: list[tuple[FakeLlmRequest, int | None]]) -> None:
        """``_update_requests``: sampled tokens reach the host; length stops finish requests."""
        for req, token in samples:
            self._pending_token.pop(req.request_id, None)
            if token is None or req.state is not State.GENERATION_IN_PROGRESS:
                continue
            req.tokens.append(token)
            result = self.results[req.request_id]
            result.tokens.append(token)
            if len(result.tokens) >= req.max_new_tokens:
                req.state, result.is_finished = State.GENERATION_COMPLETE, True

    def _process(self, batch: list[FakeLlmRequest]) -> None:
        """``_handle_responses`` (finished requests are terminated) then ``update_resources``
        (context blocks become reusable)."""
        for req in [r for r in self.active if r.state is State.GENERATION_COMPLETE]:
            self.active.remove(req)
            self._terminate(req)
        for req in batch:  # storeContextBlocks: full blocks of computed prompt KV
            if req.request_id in self.blocks.blocks and req.state is not State.LOADING:
                upto = min(self._kv_len[req.request_id], len(req.tokens) - 1)
                self.blocks.store(req.request_id, req.tokens, upto, partial=False)

    def _terminate(self, req: FakeLlmRequest) -> None:
        """``_do_terminate_request``: ``request_finished`` when the request has blocks; True
        pins them until every rank reports the save."""
        rid = req.request_id
        self._pending_token.pop(rid, None)
        if rid not in self.blocks.blocks:
            return
        saving = self._leader("request_finished", req, list(self.blocks.blocks[rid]))
        upto = min(self._kv_len.get(rid, 0), len(req.tokens) - 1)
        self.blocks.store(rid, req.tokens, upto, partial=True)  # storeBlocksForReuse
        self.blocks.release(rid, pin=bool(saving))
        self._finished_loading.discard(rid)
        if saving:
            req.state = State.SAVING
            self.ever_pinned.add(rid)
            for rank in self.ranks:
                rank.new.saving[rid] = req

    # ---- _kv_connector_terminate_requests ----
    def _get_finished(self) -> None:
        for rank in self.ranks:
            started, finished_gen = list(rank.new.loading), list(rank.new.saving)
            rank.new.move_to(rank.pending)
            saving, loading = _broadcast(self._call(rank, "get_finished", finished_gen, started))
            rank.pending.extract(list(saving), list(loading)).move_to(rank.local_done)
        all_saving = set.intersection(*(set(r.local_done.saving) for r in self.ranks))
        all_loading = set.intersection(*(set(r.local_done.loading) for r in self.ranks))
        for rank in self.ranks:
            rank.local_done.extract(sorted(all_saving), sorted(all_loading))
        for rid in sorted(all_loading):
            req = self.requests[rid]
            self.loaded_snapshots[rid] = [self._snapshot(r, rid) for r in self.ranks]
            self.parked_at.pop(rid, None)
            if req.state is State.LOADING:
                req.state = State.CONTEXT_INIT
                self._finished_loading.add(rid)
        for rid in sorted(all_saving):
            self.blocks.unpin(rid)
            self.requests[rid].state = State.GENERATION_COMPLETE

    def _snapshot(self, rank: Rank, rid: int) -> torch.Tensor:
        """The request's blocks holding prepopulated tokens, as the pool has them right when
        the load is reported (before any forward): ``(blocks, layers, kv_factor, row)``."""
        req, tpb = self.requests[rid], self.model.tokens_per_block
        ids = self.blocks.blocks.get(rid, [])[: -(-req.prepopulated_prompt_len // tpb)]
        return torch.stack([
            torch.stack([self.device.read_block(rank.pool, b, layer)
                         for layer in range(self.model.num_layers)])
            for b in ids
        ]) if ids else torch.empty(0)  # fmt: skip


def drive(
    *executors: FakeExecutor,
    until: Callable[[], bool],
    timeout_s: float = 20.0,
    what: str = "condition",
) -> None:
    """Step every executor in turn until ``until()`` holds; AssertionError past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s")
        for executor in executors:
            executor.step()
        time.sleep(0.001)
