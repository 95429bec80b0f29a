-- The unfinished-jobs quota counts a tenant's queued and running jobs at every Submit.
CREATE INDEX jobs_unfinished_by_tenant ON jobs (tenant_id) WHERE state IN (1, 2);
