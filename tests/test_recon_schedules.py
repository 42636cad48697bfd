"""The reconciliation schedules: created at start, updated (never duplicated) by the next
start, and timed as configured. The time-skipping test server has no schedules
(temporalio/sdk-java#1954), so their timing is read from the dev server's own plan of
their next actions."""

from __future__ import annotations

from datetime import UTC, timedelta

from temporalio.client import (
    Client,
    ScheduleActionStartWorkflow,
    ScheduleOverlapPolicy,
)

from paysaga.settings import Settings
from worker import ensure_recon_schedules, recon_schedule_ids


async def test_the_schedules_exist_after_start_and_a_second_start_does_not_duplicate_them(
    temporal_client: Client, settings: Settings
) -> None:
    ids = recon_schedule_ids(settings.task_queue)
    try:
        assert await ensure_recon_schedules(temporal_client, settings) == list(ids)
        assert await ensure_recon_schedules(temporal_client, settings) == []
        continuous = await temporal_client.get_schedule_handle(ids[0]).describe()
        daily = await temporal_client.get_schedule_handle(ids[1]).describe()

        # recon-continuous: every 5 minutes, a run still going makes the next one skip.
        assert [i.every for i in continuous.schedule.spec.intervals] == [timedelta(minutes=5)]
        assert continuous.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        action = continuous.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.task_queue) == (
            "ReconciliationWorkflow",
            settings.task_queue,
        )
        upcoming = continuous.info.next_action_times
        assert len(upcoming) >= 2 and upcoming[1] - upcoming[0] == timedelta(minutes=5)

        # recon-daily: 02:00 UTC every day, with a catch-up window.
        assert daily.schedule.policy.catchup_window == timedelta(hours=6)
        upcoming = daily.info.next_action_times
        assert upcoming, "the daily run has a next time"
        for at in upcoming[:3]:
            at = at.astimezone(UTC)
            assert (at.hour, at.minute, at.second) == (2, 0, 0), at
        if len(upcoming) >= 2:
            assert upcoming[1] - upcoming[0] == timedelta(days=1)

        # A start with other settings brings the schedules to them.
        changed = settings.model_copy(update={"recon_interval_s": 60, "recon_daily_hour_utc": 3})
        assert await ensure_recon_schedules(temporal_client, changed) == []
        continuous = await temporal_client.get_schedule_handle(ids[0]).describe()
        assert [i.every for i in continuous.schedule.spec.intervals] == [timedelta(minutes=1)]
        daily = await temporal_client.get_schedule_handle(ids[1]).describe()
        assert daily.info.next_action_times[0].astimezone(UTC).hour == 3
    finally:
        for schedule_id in ids:
            await temporal_client.get_schedule_handle(schedule_id).delete()
