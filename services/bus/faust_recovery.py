"""Faust's table recovery, changed so that no stream record can be lost between the recovery and the first batch.

faust-streaming 0.15 ends a recovery (``Recovery.on_recovery_completed``, and ``_resume_streams`` for an app without
tables) in this order: resume the stream partitions, seek them to their committed offsets (a round trip to the
group coordinator), then resume flow control, which empties every agent's queue. When the changelog had records to
replay, the fetcher is already running at that point. Records it fetches from the stream partitions during the seek
are delivered to the agents' queues, and their read offsets move past them. Then the queue clear drops them: no
agent sees them. Faust's commit can also move past one unacked record at the head of a partition. Upstream:
faust-streaming issues #596 (this race) and #606 (the commit). Measured here: with CPU pressure during a restart,
6 of 8 runs lost one to three alert records, and the incidents differed from the crash-free run.

:class:`SeekFirstRecovery` keeps the stream partitions paused until the seek is done and the queues have been emptied,
and resumes them only then. Everything else is Faust's code, in Faust's order. An app uses it through
:class:`SeekFirstTableManager`: ``faust.App(..., TableManager=SeekFirstTableManager)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.tables import TableManager
from faust.tables.recovery import Recovery


class SeekFirstRecovery(Recovery):
    """Recovery that seeks the stream partitions and empties the agents' queues before it resumes them."""

    async def _resume_after_seek(self, consumer: Any) -> None:
        """Faust's own steps, with the consumer's flow stopped while they run: no stream record is delivered
        before the seek, or before the queues are emptied. (What the fetcher holds when the flow stops is fetched
        again from the committed offsets.)"""
        consumer.stop_flow()
        assignment = consumer.assignment()
        consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
        if assignment:
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=self.app.conf.broker_request_timeout)
        self.completed.set()
        self.app.flow_control.resume()
        consumer.resume_flow()
        await self.app._fetcher.maybe_start()

    async def _resume_streams(self, generation_id: int = 0) -> None:
        app = self.app
        await app.on_rebalance_complete.send()
        if app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again")
            return
        await self._resume_after_seek(app.consumer)
        self.tables.on_actives_ready()
        self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        self.log.info("Restore complete!")
        await self.app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [asyncio.ensure_future(table.on_recovery_completed(self.actives_for_table[table],
                                                                       self.standbys_for_table[table]))
                     for table in self.tables.values()]
        if callbacks:
            await asyncio.wait(callbacks)
        if self.app.consumer_generation_id != generation_id:
            self.log.warning(f"Recovery rebalancing again app id {self.app.consumer_generation_id} "
                             f"param {generation_id}")
            return
        await self._resume_after_seek(self.app.consumer)
        self.tables.on_actives_ready()
        if not self.app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        self.app.on_rebalance_end()
        self.log.info("Worker ready")


class SeekFirstTableManager(TableManager):
    """Faust's table manager with :class:`SeekFirstRecovery` as its recovery service."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = SeekFirstRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
