"""DataService: presigned uploads into the caller's input area, its inputs, deletion."""

from __future__ import annotations

from typing import Any

from gpuplane.v1 import data_pb2, data_pb2_grpc

from controlplane.api.convert import timestamp
from controlplane.auth.principal import current_principal
from controlplane.data.models import InputRecord
from controlplane.data.service import DataService
from controlplane.paging import PageRequest

Context = Any


def input_pb(row: InputRecord) -> data_pb2.InputObject:
    return data_pb2.InputObject(
        key=row.key,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        uploaded_at=timestamp(row.uploaded_at),
    )


class DataServicer(data_pb2_grpc.DataServiceServicer):
    def __init__(self, data: DataService) -> None:
        self.data = data

    async def CreateUpload(
        self, request: data_pb2.CreateUploadRequest, context: Context
    ) -> data_pb2.CreateUploadResponse:
        upload = await self.data.create_upload(
            current_principal(),
            request.key,
            request.size_bytes,
            request.url_ttl_seconds,
            request.part_size_bytes,
        )
        return data_pb2.CreateUploadResponse(
            key=upload.key,
            url=upload.url,
            url_expires_at=timestamp(upload.expires_at),
            max_size_bytes=upload.max_size_bytes,
            upload_id=upload.upload_id,
            part_urls=upload.part_urls,
            part_size_bytes=upload.part_size_bytes,
        )

    async def CompleteUpload(
        self, request: data_pb2.CompleteUploadRequest, context: Context
    ) -> data_pb2.CompleteUploadResponse:
        row = await self.data.complete_upload(
            current_principal(),
            request.key,
            request.sha256,
            request.upload_id,
            [(part.part_number, part.etag) for part in request.parts],
        )
        return data_pb2.CompleteUploadResponse(input=input_pb(row))

    async def AbortUpload(
        self, request: data_pb2.AbortUploadRequest, context: Context
    ) -> data_pb2.AbortUploadResponse:
        await self.data.abort_upload(current_principal(), request.key, request.upload_id)
        return data_pb2.AbortUploadResponse()

    async def ListInputs(
        self, request: data_pb2.ListInputsRequest, context: Context
    ) -> data_pb2.ListInputsResponse:
        page = await self.data.list(
            current_principal(), request.prefix, PageRequest(request.page_token, request.page_size)
        )
        return data_pb2.ListInputsResponse(
            inputs=[input_pb(row) for row in page.items], next_page_token=page.next_cursor
        )

    async def DeleteInput(
        self, request: data_pb2.DeleteInputRequest, context: Context
    ) -> data_pb2.DeleteInputResponse:
        await self.data.delete(current_principal(), request.key)
        return data_pb2.DeleteInputResponse()
