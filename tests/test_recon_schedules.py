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
    ScheduleRange,
)

from paysaga.settings import Settings
from worker import ensure_recon_schedules, recon_schedule_ids
from workflows.reconciliation_models import ReconciliationRequest


async def request_of(client: Client, action: ScheduleActionStartWorkflow) -> object:
    """The ReconciliationRequest a schedule's action starts its workflow with."""
    (request,) = await client.data_converter.decode(action.args, [ReconciliationRequest])
    return request


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
        assert await request_of(temporal_client, action) == ReconciliationRequest(
            kind="continuous", full=False
        )

        # recon-daily: a full run at 02:00 UTC every day, skipped while one still runs,
        # and still run if Temporal comes back within the catch-up window.
        action = daily.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.task_queue) == (
            "ReconciliationWorkflow",
            settings.task_queue,
        )
        assert await request_of(temporal_client, action) == ReconciliationRequest(
            kind="daily", full=True
        )
        (calendar,) = daily.schedule.spec.calendars
        assert (tuple(calendar.hour), tuple(calendar.minute), tuple(calendar.second)) == (
            (ScheduleRange(2, 2),),
            (ScheduleRange(0),),
            (ScheduleRange(0),),
        )
        assert daily.schedule.spec.time_zone_name == "UTC"
        assert daily.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
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
