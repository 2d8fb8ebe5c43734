"""The run time: processes and devices, precision, machine limits, pre-emption, statistics."""
