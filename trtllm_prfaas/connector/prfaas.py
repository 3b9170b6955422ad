"""The PrfaaS KV cache connector: prefill nodes export KV layer by layer, decode nodes import it.

TensorRT-LLM loads it through ``kv_connector_config`` (``connector_module:
trtllm_prfaas.connector.prfaas``, ``PrfaasConnectorScheduler`` / ``PrfaasConnectorWorker``); the
reference engine hosts the same classes on CPUs. One role per deployment (``Role``); one
:class:`~trtllm_prfaas.connector.prfaas_runtime.PrfaasRuntime` per rank.

The request carrier is a :class:`~trtllm_prfaas.connector.plans.Plan` posted beside the request
(``connector/plans.py``): the scheduler takes it from its rank-0 book by the tokens it would claim
(prefill: the whole prompt; decode: all but the last token, t1). No plan: nothing is exported or
imported, counted (``plans_missed``) and logged (``prfaas_plan_missing``).

Prefill (export). The handoff is prompt plus first token: the prefill runs all L prompt tokens.
For every chunk, ``save_kv_layer`` stages the layer's newly completed blocks (device-to-host into
pinned staging on the hook's stream, with an event) and the send pump relays them once the event
completed, off the executor's thread; the chunk that ends at L also sends the partial tail block
(and, on the reference engine, every linear layer's recurrent state after L) and closes each
layer. Each rank r sends its own shard under its own transfer id to ``plan.relay_endpoints[r]``.
``request_finished`` pins the blocks until ``get_finished`` reports the transfer acknowledged
(or failed).

Decode (import). The worker fronting the engine submits the decode request only once its transfer
is COMPLETE in host memory on every rank. ``get_num_new_matched_tokens`` claims ``L -
num_computed_tokens`` tokens (never more; the C++ ``setPrepopulatedPromptLen`` check needs at
least one uncomputed token) with ``load_async=True``, and only when rank 0's transfer is COMPLETE.
``start_load_kv`` copies every block at or above ``num_computed_tokens // tokens_per_block``
(reused device blocks are never written) from host memory into the pool on the hook's stream, with
an event; ``get_finished`` reports the load once the event completed. A load that fails anyway
(a bug, or a rank whose data vanished) is logged as ``prfaas_load_failed`` and counted; the
reference engine then fails the request (``SupportsLoadFailures``) and the worker resubmits it
without the plan; inside TensorRT-LLM, which has no such call, the load is reported finished so
the request is never parked forever (its output is then not to be trusted: the error says so,
and the rank answers ``load_failed`` to the worker's status queries). No hook raises into the
executor: a failure ends only the request's own transfer.

Modules: ``prfaas_meta`` (the broadcast metadata, runtime lookup, hybrid refusal),
``prfaas_scheduler``, ``prfaas_worker``, ``prfaas_runtime`` (per-rank sockets, plan server, send
pump), ``plans`` (the carrier), ``device`` (pool <-> host copies).

Upstream behaviour this relies on (read in the stored copies named; ids work with ``read_file``):

- hooks receive ``torch.cuda.current_stream()``; the scheduler's metadata is broadcast from rank 0
  unchanged (``_run_on_leader``); ``get_finished`` counts an id only once every rank returned it
  (``mpi_allgather`` intersection); ``(0, True)`` and generation-only requests raise:
  ``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py`` ``KvCacheConnectorManager`` (1.x,
  stored 930780166; 2026 ``connectors/kv_cache_connector.py``, stored 66451088647).
- a new request's ``new_block_ids`` are all its ``get_cache_indices`` (reused blocks included) and
  its ``computed_position`` excludes the connector's claim: same file,
  ``KvCacheConnectorSchedulerOutputRequest.update_and_build_data``, ``build_scheduler_output``.
- claimed + device-matched tokens must stay below the prompt length: ``kvCacheManager.cpp``
  ``BlockManager::addSequence`` (stored 1277673704), ``llmRequest.h``
  ``setPrepopulatedPromptLen`` (stored 786144818).
- the scheduler exists on rank 0 only, both halves get ``llm_args`` only:
  ``py_executor_creator.py`` ``create_py_executor`` (000429d).
- no request field reaches a context request's connector on 1.2: ``executor/base_worker.py``
  ``BaseWorker._enqueue_request`` (stored 1131391427).
"""

from __future__ import annotations

from trtllm_prfaas.connector.prfaas_meta import PrfaasMeta, hybrid_reason
from trtllm_prfaas.connector.prfaas_scheduler import PrfaasConnectorScheduler
from trtllm_prfaas.connector.prfaas_worker import PrfaasConnectorWorker

__all__ = ["PrfaasConnectorScheduler", "PrfaasConnectorWorker", "PrfaasMeta", "hybrid_reason"]
