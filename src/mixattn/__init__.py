"""mixattn"""
