"""Task modules, one per concern; toa.tasks gathers them into the invoke collection."""
