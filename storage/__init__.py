"""Object storage (S3 API: MinIO in production, any S3 server in dev): layout, upload, presign."""
