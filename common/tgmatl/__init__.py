"""TG-MATL (Zhou & Zare, IGARSS 2026): what two or more of the igarss scripts share.

awir              the AWIR data protocol: labels, box features, box clusters, the one fold split,
                  shared flags, the exp1 head paths and the synthetic demo data
stacked_training  many small heads trained side by side in one compiled graph; per-method timing calibration
"""
