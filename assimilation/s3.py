"""The state store's S3 backend: twins in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS).

    s3://BUCKET[/PREFIX][?endpoint=http://host:port&region=REGION]

Workers on different machines that share the URL share the twins, so a patient's twin follows
its Kafka partition when a rebalance moves it (DESIGN.md §6). The endpoint may also come from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the region from ``AWS_DEFAULT_REGION``;
credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
profiles, instance roles), never from the URL, so that a URL can be logged. The bucket is
created on first use when missing and the credentials allow it.

An S3 PUT is atomic (a reader sees the old object or the new one, never part of one) and
S3 has been strongly read-after-write consistent since 2020, so the store needs nothing more
than the four ``Backend`` operations.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["S3Backend", "S3Error"]


class S3Error(OSError):
    """The bucket cannot be reached or refused an operation (the message says which)."""


class S3Backend:
    """Objects under ``prefix`` in ``bucket``; keys are the store's keys after the prefix.

    ``client``: a boto3 S3 client to use instead of making one (tests, custom sessions).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        create_bucket: bool = True,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 state store URL needs a bucket: s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if client is None:
            import boto3  # noqa: PLC0415  (only S3 users pay for importing boto3)
            from botocore.config import Config  # noqa: PLC0415

            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                # Path-style addressing: self-hosted servers (MinIO, SeaweedFS) have no
                # per-bucket DNS names. Standard retries ride out a busy or restarting server.
                config=Config(
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                    retries={"mode": "standard", "max_attempts": 5},
                    connect_timeout=5,
                    read_timeout=60,
                ),
            )
        self._client = client
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        self._errors = (BotoCoreError, ClientError)
        if create_bucket:
            self._ensure_bucket()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Backend:
        parsed = urlparse(url)
        if parsed.scheme != "s3":
            raise ValueError(f"not an s3:// URL: {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in {url!r} (endpoint, region)")
        return cls(parsed.netloc, parsed.path, endpoint_url=query.get("endpoint"), region=query.get("region"), **kwargs)

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Backend(s3://{self.bucket}/{self.prefix}{where})"

    def _fail(self, action: str, key: str, exc: Exception) -> S3Error:
        what = f" of {key!r}" if key else ""
        return S3Error(f"S3 {action}{what} in s3://{self.bucket}/{self.prefix}"
                       f"{' at ' + self.endpoint_url if self.endpoint_url else ''} failed: {exc}")

    def _ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except self._errors as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._fail("access", "", exc) from exc
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except self._errors as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # a racing worker made it
                raise self._fail("bucket creation", "", exc) from exc

    @staticmethod
    def _check(key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid key {key!r}")
        return key

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + self._check(key), Body=bytes(data))
        except self._errors as exc:
            raise self._fail("put", key, exc) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.prefix + self._check(key))
            return bytes(response["Body"].read())
        except self._errors as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(key) from None
            raise self._fail("get", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        keys = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", ()))
        except self._errors as exc:
            raise self._fail("list", prefix, exc) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + self._check(key))  # absent: no error
        except self._errors as exc:
            raise self._fail("delete", key, exc) from exc
