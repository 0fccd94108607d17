"""Slide readers: one interface (``SlideReader``), adapters per library, ``open_slide`` routes."""
