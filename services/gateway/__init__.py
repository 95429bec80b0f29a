"""The gRPC gateway: Submit, Watch, Cancel, GetJob and ListJobs; it never runs job code."""
