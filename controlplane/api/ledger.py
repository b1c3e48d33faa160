"""LedgerService: balances, statements, deposits and the consistency check."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gpuplane.v1 import ledger_pb2, ledger_pb2_grpc, types_pb2

from controlplane.api.convert import from_timestamp, timestamp
from controlplane.auth.principal import current_principal
from controlplane.errors import InvalidArgument, Unimplemented
from controlplane.idempotency import check_key
from controlplane.ledger.models import Transfer
from controlplane.ledger.service import (
    AccountKind,
    Balance,
    LedgerService,
    TransferKind,
    account_id,
)
from controlplane.paging import decode_token, encode_token, page_size

Context = Any

KIND_PB = {k: types_pb2.TransferKind.Value(f"TRANSFER_KIND_{k.name}") for k in TransferKind}
PB_KIND = {v: k for k, v in KIND_PB.items()}
ACCOUNT_PB = {k: types_pb2.AccountKind.Value(f"ACCOUNT_KIND_{k.name}") for k in AccountKind}
PB_ACCOUNT = {v: k for k, v in ACCOUNT_PB.items()}


def balance_pb(balance: Balance) -> types_pb2.Balance:
    return types_pb2.Balance(
        tenant_id=balance.tenant_id,
        available_micro_credits=balance.available,
        held_micro_credits=balance.held,
        earnings_micro_credits=balance.earnings,
    )


def entry_pb(row: Transfer, tenant_id: str) -> types_pb2.LedgerEntry:
    """One transfer seen from the tenant's side (credit positive, debit negative)."""
    credited = row.credit_account_id.startswith(f"{tenant_id}:")
    account = row.credit_account_id if credited else row.debit_account_id
    kind = AccountKind(account.rsplit(":", 1)[1])
    return types_pb2.LedgerEntry(
        transfer_id=row.id,
        kind=KIND_PB[TransferKind(row.kind)],
        account_kind=ACCOUNT_PB[kind],
        amount_micro_credits=row.amount if credited else -row.amount,
        balance_after_micro_credits=row.credit_balance_after
        if credited
        else row.debit_balance_after,
        job_id=row.job_id or "",
        attempt=row.attempt or 0,
        reference=row.reference,
        created_at=timestamp(row.created_at),
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
        cursor = decode_token(request.page_token)
        before = None
        if cursor:
            try:
                before = (datetime.fromisoformat(cursor["t"]), str(cursor["id"]))
            except (KeyError, ValueError, TypeError):
                raise InvalidArgument("page_token", "is not a token this server issued") from None
        limit = page_size(request.page_size)
        rows = await self.ledger.entries(
            tenant,
            accounts,
            kinds,
            request.job_id or None,
            from_timestamp(request, "start_time"),
            from_timestamp(request, "end_time"),
            before,
            limit + 1,
        )
        more = len(rows) > limit
        rows = list(rows[:limit])
        token = (
            encode_token({"t": rows[-1].created_at.isoformat(), "id": rows[-1].id}) if more else ""
        )
        return ledger_pb2.ListEntriesResponse(
            entries=[entry_pb(r, tenant) for r in rows], next_page_token=token
        )

    async def Deposit(
        self, request: ledger_pb2.DepositRequest, context: Context
    ) -> ledger_pb2.DepositResponse:
        current_principal()
        if not request.tenant_id:
            raise InvalidArgument("tenant_id", "is required")
        if request.amount_micro_credits <= 0:
            raise InvalidArgument("amount_micro_credits", "must be positive")
        key = check_key(request.idempotency_key)
        if key is None:
            raise InvalidArgument("idempotency_key", "is required for deposits")
        from controlplane.auth.repository import AuthRepository
        from controlplane.errors import NotFound

        async with self.ledger.db.read() as session:
            if await AuthRepository(session).get_tenant(request.tenant_id) is None:
                raise NotFound(f"tenant_id: no tenant {request.tenant_id!r}")
        if len(request.reference) > 500:
            raise InvalidArgument("reference", "at most 500 characters")
        row, balance = await self.ledger.deposit(
            request.tenant_id, request.amount_micro_credits, request.reference, key
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

    async def Payout(self, request: Any, context: Context) -> Any:
        raise Unimplemented("LedgerService.Payout arrives with the ledger issue")

    async def RefundJob(self, request: Any, context: Context) -> Any:
        raise Unimplemented("LedgerService.RefundJob arrives with the ledger issue")

    async def GetUsage(self, request: Any, context: Context) -> Any:
        raise Unimplemented("LedgerService.GetUsage arrives with the ledger issue")


__all__ = ["LedgerServicer", "account_id"]
