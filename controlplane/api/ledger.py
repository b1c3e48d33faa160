"""LedgerService: balances, statements, deposits, payouts, refunds, usage and the check."""

from __future__ import annotations

from typing import Any

from gpuplane.v1 import ledger_pb2, ledger_pb2_grpc, types_pb2

from controlplane.api.convert import from_timestamp, timestamp
from controlplane.auth.principal import current_principal
from controlplane.errors import InvalidArgument, PermissionDenied
from controlplane.idempotency import check_key
from controlplane.ledger.models import Payout, PayoutState
from controlplane.ledger.service import (
    AccountKind,
    Balance,
    Budget,
    Entry,
    LedgerService,
    TransferKind,
    account_id,
)
from controlplane.ledger.usage import UsageGrouping, UsageQuery, UsageRow, readable_usage
from controlplane.paging import PageRequest

Context = Any

KIND_PB = {k: types_pb2.TransferKind.Value(f"TRANSFER_KIND_{k.name}") for k in TransferKind}
PB_KIND = {v: k for k, v in KIND_PB.items()}
ACCOUNT_PB = {k: types_pb2.AccountKind.Value(f"ACCOUNT_KIND_{k.name}") for k in AccountKind}
PB_ACCOUNT = {v: k for k, v in ACCOUNT_PB.items()}
PAYOUT_PB = {s: ledger_pb2.PayoutState.Value(f"PAYOUT_STATE_{s.name}") for s in PayoutState}
PB_PAYOUT = {v: k for k, v in PAYOUT_PB.items()}
PB_GROUPING = {
    ledger_pb2.USAGE_GROUPING_UNSPECIFIED: UsageGrouping.JOB,
    ledger_pb2.USAGE_GROUPING_JOB: UsageGrouping.JOB,
    ledger_pb2.USAGE_GROUPING_DAY: UsageGrouping.DAY,
    ledger_pb2.USAGE_GROUPING_MONTH: UsageGrouping.MONTH,
    ledger_pb2.USAGE_GROUPING_GPU_MODEL: UsageGrouping.GPU_MODEL,
    ledger_pb2.USAGE_GROUPING_PROVIDER: UsageGrouping.PROVIDER,
}


def required_key(value: str, what: str) -> str:
    key = check_key(value)
    if key is None:
        raise InvalidArgument("idempotency_key", f"is required for {what}")
    return key


def usage_row_pb(row: UsageRow) -> ledger_pb2.UsageRow:
    return ledger_pb2.UsageRow(
        job_id=row.job_id,
        period_start=timestamp(row.period_start),
        gpu_time_ms=row.gpu_time_ms,
        cost_micro_credits=row.cost,
        host_id=row.host_id,
        gpu_model=row.gpu_model,
        avg_gpu_utilization_percent=row.avg_gpu_utilization_percent,
        job_count=row.job_count,
        avg_gpu_utilization_basis_points=row.avg_gpu_utilization_basis_points,
        provider_tenant_id=row.provider_tenant_id,
        utilized_gpu_time_ms=row.utilized_gpu_time_ms,
        fee_micro_credits=row.fee,
    )


def balance_pb(balance: Balance) -> types_pb2.Balance:
    return types_pb2.Balance(
        tenant_id=balance.tenant_id,
        available_micro_credits=balance.available,
        held_micro_credits=balance.held,
        earnings_micro_credits=balance.earnings,
        accounts=[
            types_pb2.AccountBalance(
                account_id=a.account_id, kind=ACCOUNT_PB[a.kind], balance_micro_credits=a.balance
            )
            for a in balance.accounts
        ],
    )


def entry_pb(entry: Entry) -> types_pb2.LedgerEntry:
    """One leg of a transfer, on one of the tenant's accounts (credit positive)."""
    row = entry.transfer
    return types_pb2.LedgerEntry(
        transfer_id=row.id,
        kind=KIND_PB[TransferKind(row.kind)],
        account_kind=ACCOUNT_PB[entry.account_kind],
        amount_micro_credits=entry.amount,
        balance_after_micro_credits=entry.balance_after,
        job_id=row.job_id or "",
        attempt=row.attempt or 0,
        reference=row.reference,
        created_at=timestamp(row.created_at),
        account_id=entry.account_id,
    )


def payout_pb(row: Payout) -> ledger_pb2.PayoutRecord:
    return ledger_pb2.PayoutRecord(
        payout_id=row.id,
        tenant_id=row.tenant_id,
        amount_micro_credits=row.amount,
        destination=row.destination,
        state=PAYOUT_PB[PayoutState(row.state)],
        transfer_id=row.transfer_id,
        reversal_transfer_id=row.reversal_transfer_id or "",
        reason=row.reason,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def budget_pb(budget: Budget) -> ledger_pb2.Budget:
    return ledger_pb2.Budget(
        tenant_id=budget.tenant_id,
        monthly_limit_micro_credits=budget.monthly_limit,
        alert_percents=budget.alert_percents,
        month_start=timestamp(budget.month_start),
        spent_micro_credits=budget.spent,
        committed_micro_credits=budget.committed,
        remaining_micro_credits=budget.remaining,
        alerts=[
            ledger_pb2.SpendingAlert(
                percent=a.percent,
                spent_micro_credits=a.spent,
                monthly_limit_micro_credits=a.monthly_limit,
                created_at=timestamp(a.created_at),
            )
            for a in budget.alerts
        ],
    )


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: LedgerService) -> None:
        self.ledger = ledger

    async def GetBalance(
        self, request: ledger_pb2.GetBalanceRequest, context: Context
    ) -> ledger_pb2.GetBalanceResponse:
        tenant = current_principal().require_tenant(request.tenant_id)
        return ledger_pb2.GetBalanceResponse(balance=balance_pb(await self.ledger.balance(tenant)))

    async def ListEntries(
        self, request: ledger_pb2.ListEntriesRequest, context: Context
    ) -> ledger_pb2.ListEntriesResponse:
        tenant = current_principal().require_tenant(request.tenant_id)
        try:
            accounts = [PB_ACCOUNT[v] for v in request.account_kinds]
        except KeyError:
            raise InvalidArgument("account_kinds", "unknown account kind") from None
        try:
            kinds = [PB_KIND[v] for v in request.kinds]
        except KeyError:
            raise InvalidArgument("kinds", "unknown transfer kind") from None
        page = await self.ledger.entries(
            tenant,
            accounts,
            kinds,
            request.job_id or None,
            from_timestamp(request, "start_time"),
            from_timestamp(request, "end_time"),
            PageRequest(request.page_token, request.page_size),
        )
        return ledger_pb2.ListEntriesResponse(
            entries=[entry_pb(e) for e in page.items], next_page_token=page.next_cursor
        )

    async def Deposit(
        self, request: ledger_pb2.DepositRequest, context: Context
    ) -> ledger_pb2.DepositResponse:
        caller = current_principal().tenant_id
        if not request.tenant_id:
            raise InvalidArgument("tenant_id", "is required")
        if request.amount_micro_credits <= 0:
            raise InvalidArgument("amount_micro_credits", "must be positive")
        key = required_key(request.idempotency_key, "deposits")
        from controlplane.auth.repository import AuthRepository
        from controlplane.errors import NotFound

        async with self.ledger.db.read() as session:
            if await AuthRepository(session).get_tenant(request.tenant_id) is None:
                raise NotFound(f"tenant_id: no tenant {request.tenant_id!r}")
        if len(request.reference) > 500:
            raise InvalidArgument("reference", "at most 500 characters")
        row, balance = await self.ledger.deposit(
            request.tenant_id, request.amount_micro_credits, request.reference, key, caller=caller
        )
        return ledger_pb2.DepositResponse(transfer_id=row.id, balance=balance_pb(balance))

    async def CheckLedger(
        self, request: ledger_pb2.CheckLedgerRequest, context: Context
    ) -> ledger_pb2.CheckLedgerResponse:
        report = await self.ledger.check()
        return ledger_pb2.CheckLedgerResponse(
            consistent=report.consistent,
            account_count=report.account_count,
            transfer_count=report.transfer_count,
            balance_sum_micro_credits=report.balance_sum,
            mismatches=[
                ledger_pb2.BalanceMismatch(
                    account_id=a,
                    account_kind=ACCOUNT_PB[AccountKind(k)],
                    tenant_id=t,
                    stored_micro_credits=s,
                    recomputed_micro_credits=r,
                )
                for a, k, t, s, r in report.mismatches
            ],
        )

    async def Payout(
        self, request: ledger_pb2.PayoutRequest, context: Context
    ) -> ledger_pb2.PayoutResponse:
        principal = current_principal()
        tenant = principal.require_tenant(request.tenant_id)
        if request.amount_micro_credits <= 0:
            raise InvalidArgument("amount_micro_credits", "must be positive")
        if not request.destination:
            raise InvalidArgument("destination", "is required")
        if len(request.destination) > 500:
            raise InvalidArgument("destination", "at most 500 characters")
        key = required_key(request.idempotency_key, "payouts")
        payout, balance = await self.ledger.payout(
            tenant,
            request.amount_micro_credits,
            request.destination,
            key,
            caller=principal.tenant_id,
        )
        return ledger_pb2.PayoutResponse(
            payout_id=payout.id,
            state=PAYOUT_PB[PayoutState(payout.state)],
            transfer_id=payout.transfer_id,
            balance=balance_pb(balance),
        )

    async def ListPayouts(
        self, request: ledger_pb2.ListPayoutsRequest, context: Context
    ) -> ledger_pb2.ListPayoutsResponse:
        principal = current_principal()
        tenant: str | None = principal.require_tenant(request.tenant_id)
        if request.all_tenants:
            if not principal.is_admin:
                raise PermissionDenied("all_tenants: only admins may list every tenant's payouts")
            if request.tenant_id:
                raise InvalidArgument("all_tenants", "give either tenant_id or all_tenants")
            tenant = None
        try:
            states = [PB_PAYOUT[v] for v in request.states]
        except KeyError:
            raise InvalidArgument("states", "unknown payout state") from None
        page = await self.ledger.list_payouts(
            tenant, states, PageRequest(request.page_token, request.page_size)
        )
        return ledger_pb2.ListPayoutsResponse(
            payouts=[payout_pb(p) for p in page.items], next_page_token=page.next_cursor
        )

    async def MarkPayoutPaid(
        self, request: ledger_pb2.MarkPayoutPaidRequest, context: Context
    ) -> ledger_pb2.MarkPayoutPaidResponse:
        if not request.payout_id:
            raise InvalidArgument("payout_id", "is required")
        payout = await self.ledger.mark_payout_paid(request.payout_id)
        return ledger_pb2.MarkPayoutPaidResponse(payout=payout_pb(payout))

    async def FailPayout(
        self, request: ledger_pb2.FailPayoutRequest, context: Context
    ) -> ledger_pb2.FailPayoutResponse:
        if not request.payout_id:
            raise InvalidArgument("payout_id", "is required")
        if not request.reason:
            raise InvalidArgument("reason", "is required")
        if len(request.reason) > 500:
            raise InvalidArgument("reason", "at most 500 characters")
        payout, balance = await self.ledger.fail_payout(request.payout_id, request.reason)
        return ledger_pb2.FailPayoutResponse(payout=payout_pb(payout), balance=balance_pb(balance))

    async def RefundJob(
        self, request: ledger_pb2.RefundJobRequest, context: Context
    ) -> ledger_pb2.RefundJobResponse:
        caller = current_principal().tenant_id
        if not request.job_id:
            raise InvalidArgument("job_id", "is required")
        if request.amount_micro_credits < 0:
            raise InvalidArgument("amount_micro_credits", "must not be negative (0 = all)")
        if not request.reason:
            raise InvalidArgument("reason", "is required")
        if len(request.reason) > 500:
            raise InvalidArgument("reason", "at most 500 characters")
        key = required_key(request.idempotency_key, "refunds")
        refund = await self.ledger.refund_job(
            request.job_id, request.amount_micro_credits, request.reason, key, caller=caller
        )
        return ledger_pb2.RefundJobResponse(
            transfer_id=refund.transfer_id,
            refunded_micro_credits=refund.refunded,
            balance=balance_pb(refund.balance),
        )

    async def GetUsage(
        self, request: ledger_pb2.GetUsageRequest, context: Context
    ) -> ledger_pb2.GetUsageResponse:
        scope = readable_usage(current_principal(), request.tenant_id, request.all_tenants)
        grouping = PB_GROUPING.get(request.group_by)
        if grouping is None:
            raise InvalidArgument("group_by", "unknown grouping")
        report = await self.ledger.usage(
            UsageQuery(
                tenant_id=scope.tenant_id,
                provider_tenant_id=scope.provider_tenant_id,
                job_id=request.job_id or None,
                start=from_timestamp(request, "start_time"),
                end=from_timestamp(request, "end_time"),
                grouping=grouping,
                page=PageRequest(request.page_token, request.page_size),
            )
        )
        return ledger_pb2.GetUsageResponse(
            rows=[usage_row_pb(r) for r in report.rows],
            total_gpu_time_ms=report.total_gpu_time_ms,
            total_cost_micro_credits=report.total_cost,
            next_page_token=report.next_cursor,
            total_utilized_gpu_time_ms=report.total_utilized_gpu_time_ms,
            total_fee_micro_credits=report.total_fee,
        )

    async def SetSpendingLimit(
        self, request: ledger_pb2.SetSpendingLimitRequest, context: Context
    ) -> ledger_pb2.SetSpendingLimitResponse:
        tenant = await self._tenant(request.tenant_id)
        budget = await self.ledger.set_spending_limit(
            tenant, request.monthly_limit_micro_credits, list(request.alert_percents)
        )
        return ledger_pb2.SetSpendingLimitResponse(budget=budget_pb(budget))

    async def GetBudget(
        self, request: ledger_pb2.GetBudgetRequest, context: Context
    ) -> ledger_pb2.GetBudgetResponse:
        tenant = await self._tenant(request.tenant_id)
        return ledger_pb2.GetBudgetResponse(budget=budget_pb(await self.ledger.budget(tenant)))

    async def _tenant(self, tenant_id: str) -> str:
        """The tenant a request names: the caller's own, or (admins) one that exists."""
        principal = current_principal()
        tenant = principal.require_tenant(tenant_id)
        if tenant != principal.tenant_id:
            await self.ledger.require_tenant(tenant)
        return tenant


__all__ = ["LedgerServicer", "account_id"]
