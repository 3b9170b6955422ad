"""The batch's forward pass on every rank, and what follows it: sampling, request states,
responses, termination.

``_forward_step`` (``py_executor.py`` 736889464; batch not empty): per rank and layer
    ``wait_for_layer_load(i, stream)``, the KV writes, ``save_kv_layer(i, stream)``; then
    ``wait_for_save(stream)``. An exception here fails every active request (``_handle_errors``);
    with the overlap scheduler the loop then dies too (``assert sample_state is not None`` after
    the failed forward). An exception from any other connector call kills the loop.
Sampling and responses: ``_do_terminate_request``: ``request_finished(request,
    get_cache_indices(request))`` on the leader, broadcast; True pins its blocks. Blocks with
    computed KV are stored for reuse (``update_resources``/``store_context_blocks``) and stay
    cached after release until a new allocation evicts them. (When the overlap scheduler makes
    them run: ``executor``.)

Versions (see the package docstring): a saving request's blocks stay allocated until every rank
reports the save (older loops keep the request and free it then; newer ones pin its blocks with
``store_blocks_for_reuse(request, True)`` and ``unpin_blocks_by_id``).
"""

from __future__ import annotations

import torch

from tests.connector.trtllm_fake.connector_manager import ConnectorManagerSteps
from tests.connector.trtllm_fake.model import kv_rows, next_token, shard
from tests.connector.trtllm_fake.ranks import Rank
from tests.connector.trtllm_fake.requests import FakeLlmRequest, State


class ForwardSteps(ConnectorManagerSteps):
    """The forward pass and its aftermath (a layer of ``FakeExecutor``; see ``state``)."""

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
